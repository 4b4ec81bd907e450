"""Prompt building: turns -> chat-template messages -> the newest turns that fit the budget."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from bot.errors import MessageTooLongError
from bot.storage.models import Role
from bot.turns import Prompt, Turn

if TYPE_CHECKING:
    from bot.engine import LoadedModel

# When a channel's history outgrows the prompt budget, cut it to this share of the budget: the
# following turns then extend the same prompt (whose KV the engine keeps) until the next cut,
# instead of every turn dropping one old turn and changing the prompt's beginning.
TRIM_TO = 0.6
PLAIN_STOP = ("\nUser:", "\nSystem:")  # where a plain-transcript reply ends


def speaker_label(name: str, author_id: int | None) -> str:
    """A name safe to put before a colon: one line, no colons, at most 32 characters."""
    label = re.sub(r"[\s:]+", " ", name).strip()[:32].strip()
    return label or f"user{author_id if author_id is not None else ''}"


def chat_messages(system: str | None, turns: Sequence[Turn], *, named: bool) -> list[dict]:
    """Turns as chat-template messages: system first, user turns named when `named`, a leading
    assistant turn dropped and consecutive turns of one role merged (templates that insist on
    user/assistant alternation accept the result)."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    seen_user = False
    for turn in turns:
        seen_user = seen_user or turn.role == Role.USER
        if turn.role not in (Role.USER, Role.ASSISTANT) or not seen_user:
            continue
        content = turn.content
        if named and turn.role == Role.USER:
            content = f"{speaker_label(turn.author_name, turn.author_id)}: {content}"
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": str(turn.role), "content": content})
    return messages


def build_prompt(
    turns: Sequence[Turn],
    *,
    system: str | None,
    encode_chat: Callable[[list[dict]], tuple[str, list[int]]],
    budget: int,
    keep: int | None = None,
    trim_to: float = 1.0,
) -> Prompt:
    """The system prompt plus the newest turns whose prompt fits in `budget` tokens;
    `encode_chat` turns messages into (prompt text, token ids), as encode_messages does.

    The last turn (the message being answered) must fit; older turns are dropped oldest first.
    `keep`: the newest turns to use if they fit (where the conversation's previous prompt
    started), so consecutive prompts begin alike. When turns must be dropped, the prompt is cut
    to fit `trim_to` x budget, which leaves room for the next turns before the next cut.
    MessageTooLongError when even the last turn alone does not fit.
    """
    if not turns:
        raise ValueError("build_prompt needs at least the turn being answered")
    named = len({t.author_id for t in turns if t.role == Role.USER}) > 1

    def attempt(count: int) -> tuple[str, list[int]]:
        return encode_chat(chat_messages(system, turns[len(turns) - count :], named=named))

    first = keep if keep is not None and 0 < keep <= len(turns) else len(turns)
    text, ids = attempt(first)  # the window or everything: the common case is one render
    if len(ids) <= budget:
        return Prompt(text, ids, first, len(turns) - first, named)
    text, ids = attempt(1)  # `first` turns do not fit, so no more than first - 1 can
    if len(ids) > budget:
        raise MessageTooLongError(
            f"prompt of {len(ids)} tokens with only the newest turn exceeds the budget {budget}",
            f"That message is too long for me to read ({len(ids)} tokens with my instructions; "
            f"the limit is {budget}). Please shorten it.",
        )
    target = max(int(budget * trim_to), len(ids))
    low, high = 1, max(1, first - 1)  # low always fits; find the largest count that fits
    best = (text, ids)
    while low < high:
        mid = (low + high + 1) // 2
        candidate = attempt(mid)
        if len(candidate[1]) <= target:
            low, best = mid, candidate
        else:
            high = mid - 1
    return Prompt(best[0], best[1], low, len(turns) - low, named)


def plain_transcript(messages: list[dict]) -> str:
    """A conversation for a model without a chat template: "Role: text" lines, then "Assistant:"."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def encode_messages(
    model: LoadedModel, messages: list[dict], thinking: str = "auto"
) -> tuple[str, list[int]]:
    """(prompt text, token ids) through the model's chat template, else as a plain transcript.
    Text from users is plain text either way: only the template's markup gives special tokens.
    `thinking`: on, off or auto (the template's default), for templates with enable_thinking."""
    if model.manifest.tokenizer.chat_template:
        return model.encode_prompt(messages, **model.thinking_vars(thinking))
    text = plain_transcript(messages)
    return text, model.encode_text(text)


def encode_continuation(
    model: LoadedModel, messages: list[dict], thinking: str = "auto"
) -> tuple[str, list[int]]:
    """encode_messages for a prompt that ends inside the assistant's reply (to continue it):
    the messages before it with the generation prompt, then the reply's text so far."""
    if not messages or messages[-1]["role"] != "assistant":
        return encode_messages(model, messages, thinking)
    text, ids = encode_messages(model, messages[:-1], thinking)
    tail = messages[-1]["content"]
    return text + tail, ids + model.encode_text(tail)


def encode(model: LoadedModel, text: str) -> list[int]:
    """Token ids of user text as plain text (special-token strings in it are characters)."""
    return model.encode_text(text)


def default_system(model: LoadedModel) -> str | None:
    """The model's own system prompt if its manifest names one (else the template's default)."""
    value = model.manifest.generation.get("system_prompt")
    return value if isinstance(value, str) and value.strip() else None
