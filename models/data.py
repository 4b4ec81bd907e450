"""Data specs (chitchat, chatterbot:LANG, .jsonl, text) -> conversations -> ids and loss masks."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.errors import ModelError, first_line

if TYPE_CHECKING:
    from models.tokenizer import TokenizerBundle

Message = dict[str, str]
Conversation = list[Message]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of tokens outside the loss (cross_entropy's ignore_index)
SPEC_HELP = "chitchat, chatterbot:LANG, a .jsonl file of {'messages': [...]} or a plain-text file"
TEXT_CHUNK_CHARS = 4000  # plain text is cut into chunks of about this size, at line breaks


@dataclass
class Dataset:
    """Either dialogue (conversations) or plain text (chunks), read from one spec."""

    spec: str
    conversations: list[Conversation]
    texts: list[str]

    @property
    def is_dialogue(self) -> bool:
        return bool(self.conversations)

    @property
    def items(self) -> list[Conversation] | list[str]:
        return self.conversations if self.is_dialogue else self.texts

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Example:
    """One training sequence: token ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


# -----------------------------------------------------------------------------
# reading specs


def load_dataset(spec: str) -> Dataset:
    """Read a data spec; ModelError (one line, naming the file) when unknown, empty or malformed."""
    if spec == "chitchat":
        return Dataset(spec, read_chitchat(), [])
    if spec.startswith("chatterbot:"):
        return Dataset(spec, read_chatterbot(spec.split(":", 1)[1]), [])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".jsonl":
        return Dataset(spec, read_jsonl(path), [])
    if path.is_file():
        return Dataset(spec, [], read_text(path))
    if path.exists():
        raise ModelError(f"{path}: is a folder, not a data file (expected {SPEC_HELP})")
    if path.suffix or "/" in spec:
        raise ModelError(f"{path}: no such data file")
    raise ModelError(f"unknown data spec {spec!r}: expected {SPEC_HELP}")


def alternating(lines: list[str]) -> Conversation:
    """Lines spoken in turn by two people, the first as the user and the second as the assistant."""
    return [{"role": ("user", "assistant")[i % 2], "content": line} for i, line in enumerate(lines)]


def read_chitchat() -> list[Conversation]:
    """The chitchat-dataset package: each message (a run of one sender's utterances) is a turn."""
    try:
        import chitchat_dataset
    except ImportError:
        raise ModelError("chitchat: the chitchat-dataset package is not installed") from None
    conversations = []
    for turns in chitchat_dataset.ConversationDataset():
        lines = [t.strip() for t in turns]
        lines = [t for t in lines if t]
        if len(lines) >= 2:
            conversations.append(alternating(lines))
    if not conversations:
        raise ModelError("chitchat: the chitchat-dataset package holds no conversations")
    return conversations


def read_chatterbot(language: str) -> list[Conversation]:
    """Every `conversations` entry of the chatterbot-corpus YAML files of one language."""
    try:
        import yaml
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError:
        raise ModelError("chatterbot: the chatterbot-corpus package is not installed") from None
    root = Path(DATA_DIRECTORY)
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    if language not in available:
        raise ModelError(
            f"chatterbot:{language}: unknown language; available: {', '.join(available)}"
        )
    conversations = []
    for file in sorted((root / language).glob("*.yml")):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ModelError(f"{file}: not readable YAML ({first_line(exc)})") from None
        for entry in data.get("conversations") or []:
            if not isinstance(entry, list) or any(line is None for line in entry):
                continue
            lines = [str(line).strip() for line in entry]
            if len(lines) >= 2 and all(lines):
                conversations.append(alternating(lines))
    if not conversations:
        raise ModelError(f"{root / language}: no conversations")
    return conversations


def read_jsonl(path: Path) -> list[Conversation]:
    """One {"messages": [{"role", "content"}, ...]} object per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not readable ({first_line(exc)})") from None
    conversations = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        problem = _conversation_problem(record)
        if problem:
            raise ModelError(f"{path}:{number}: {problem}")
        conversations.append(
            [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        )
    if not conversations:
        raise ModelError(f"{path}: no conversations (empty file)")
    return conversations


def _conversation_problem(record: Any) -> str | None:
    """Why a jsonl record is not a usable conversation, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return 'expected an object with a "messages" list'
    messages = record["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f'message {i} needs a string "content"'
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "conversation has no assistant message"
    return None


def read_text(path: Path) -> list[str]:
    """A UTF-8 text file cut into chunks of about TEXT_CHUNK_CHARS characters at line breaks."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable UTF-8 text file ({first_line(exc)})") from None
    if not text.strip():
        raise ModelError(f"{path}: empty text file")
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > TEXT_CHUNK_CHARS:  # a very long line is cut where it must be
            chunks.append(current + line[: TEXT_CHUNK_CHARS - len(current)])
            line, current = line[TEXT_CHUNK_CHARS - len(current) :], ""
        if len(current) + len(line) > TEXT_CHUNK_CHARS:
            chunks.append(current)
            current = ""
        current += line
    chunks.append(current)
    return [c for c in chunks if c.strip()]


# -----------------------------------------------------------------------------
# the train / validation split


def item_hash(item: Conversation | str) -> str:
    """A stable fingerprint of a conversation or text chunk."""
    return hashlib.sha256(json.dumps(item, sort_keys=True).encode("utf-8")).hexdigest()


# the share held out for validation: fine-tuning's early stopping and `eval --split val` must agree
VAL_FRACTION = 0.05


def split_items(items: list, val_fraction: float = VAL_FRACTION) -> tuple[list, list]:
    """(train, validation): the round(n * val_fraction) items (at least one) of smallest hash.

    Depends only on the items' content, so the same data always splits the same way, whatever its
    order; both parts keep the input order.
    """
    if not 0 < val_fraction < 1:
        raise ModelError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if len(items) < 2:
        raise ModelError(
            f"need at least 2 conversations or text chunks to hold one out, got {len(items)}"
        )
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    ranked = sorted(range(len(items)), key=lambda i: (item_hash(items[i]), i))
    val_ids = set(ranked[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_ids]
    val = [x for i, x in enumerate(items) if i in val_ids]
    return train, val


# -----------------------------------------------------------------------------
# tokenization


def assistant_spans(
    tokenizer: TokenizerBundle, messages: Conversation, full: str, until: int | None = None
) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns in `full`, the rendered conversation
    (only those starting before character `until`, when given).

    Each span is found by rendering the prefix before the turn (with the generation prompt) and
    the prefix including it: the turn is what the second adds to the first, trailing whitespace
    excluded (so it is the reply plus its end-of-turn token).
    """
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k == 0:  # an opening assistant line has no prompt
            continue
        if until is not None and spans and spans[-1][1] >= until:
            break
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ModelError(
                "the chat template does not render conversations prefix by prefix, so the "
                "assistant turns cannot be located for the loss mask"
            )
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return spans


def encode_conversation(
    tokenizer: TokenizerBundle, messages: Conversation, max_length: int
) -> Example | None:
    """Token ids of the rendered conversation, truncated to max_length, with labels on the tokens
    that overlap an assistant turn; None when no assistant token survives truncation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    ids = encoding.ids[:max_length]
    # turns that start past the truncation point need not be located
    until = encoding.offsets[max_length][0] if len(encoding.ids) > max_length else None
    spans = assistant_spans(tokenizer, messages, text, until)
    labels = [IGNORE] * len(ids)
    for i, (start, end) in enumerate(encoding.offsets[: len(ids)]):
        # a token that overlaps a turn is labelled, also one that merges its first character
        # with the header before it (as transformers' assistant masks do)
        if any(start < e and max(end, start + 1) > s for s, e in spans):
            labels[i] = ids[i]
    if all(label == IGNORE for label in labels[1:]):  # the first token is never predicted
        return None
    return Example(ids, labels)


def encode_text(tokenizer: TokenizerBundle, text: str, max_length: int) -> list[Example]:
    """A text chunk (plus the end-of-text token) as windows of max_length tokens, all labelled."""
    ids = tokenizer.encode(text)
    eos = tokenizer.token_id(tokenizer.eos_token)
    if eos is not None:
        ids.append(eos)
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(w, list(w)) for w in windows if len(w) >= 2]


def encode_items(
    tokenizer: TokenizerBundle, items: list, max_length: int, dialogue: bool
) -> list[Example]:
    """Examples for a list of conversations (dialogue) or text chunks."""
    if max_length < 2:
        raise ModelError(f"max length must be at least 2 tokens, got {max_length}")
    examples: list[Example] = []
    for item in items:
        if dialogue:
            example = encode_conversation(tokenizer, item, max_length)
            examples += [example] if example is not None else []
        else:
            examples += encode_text(tokenizer, item, max_length)
    return examples


def pad_id_of(tokenizer: TokenizerBundle) -> int:
    """The id used to pad batches (never seen by the loss): pad, else eos, else 0."""
    for token in (tokenizer.pad_token, tokenizer.eos_token):
        token_id = tokenizer.token_id(token)
        if token_id is not None:
            return token_id
    return 0


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and labels [B, T]. Causal attention never looks right, so the
    padding needs no attention mask; its labels are IGNORE."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


class TrainBatches:
    """Shuffled micro-batches over the training items, each item encoded on first use.

    Micro-batch number c is fully determined by (seed, c): epoch c // per_epoch in a shuffled
    order fixed by (seed, epoch). A resumed run just continues counting.
    """

    def __init__(
        self,
        items: list,
        encode: Callable[[Any], Example | None],
        batch_size: int,
        seed: int,
    ) -> None:
        if batch_size < 1:
            raise ModelError(f"batch size must be at least 1, got {batch_size}")
        self.items, self.encode, self.batch_size, self.seed = items, encode, batch_size, seed
        self.per_epoch = math.ceil(len(items) / batch_size)
        self._cache: dict[int, Example | None] = {}
        self._order: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        """The item order of one epoch, fixed by (seed, epoch)."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.items), generator=generator).tolist())
        return self._order[1]

    def batch(self, counter: int) -> list[Example]:
        """The examples of micro-batch `counter` (items without a labelled token are left out)."""
        epoch, index = divmod(counter, self.per_epoch)
        chosen = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        for i in chosen:
            if i not in self._cache:
                self._cache[i] = self.encode(self.items[i])
        return [e for e in (self._cache[i] for i in chosen) if e is not None]
