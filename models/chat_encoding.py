"""Chat prompts as token ids in which only the template's own markup becomes special tokens."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer

from models.chat_template import render_chat

# Markers stand for the template's special tokens while it renders: MARK + chr(_FIRST + k) + MARK
# for the k-th special token, MARK a private-use character that no input string contains.
_MARKS = range(0xE000, 0xF900)
_FIRST = 0xF0000
# special tokens with whitespace or jinja delimiters are left alone in the template source (the
# replacement could land inside a tag and break it); they come out as plain text
_UNSAFE_IN_SOURCE = re.compile(r"[\s{}%#]")


class ChatEncoder:
    """A tokenizer and a chat template that turn a conversation into prompt text and token ids.

    Text that came from outside the template (message contents, names, persona, any extra
    variable) is encoded as plain text: a message that spells `<|im_end|>` gets the tokens of
    those characters, never the control token, so it cannot close its turn or open another. Only
    the template source and the special-token variables (bos_token, eos_token, ...) produce
    special tokens. For text without special-token strings the ids are exactly those of the
    rendered text tokenized as a whole (what transformers gives).

    How: the template is rendered with every special token in its source and variables replaced
    by a marker; the result is encoded by a copy of the tokenizer that reads special-token
    strings as plain text (`encode_special_tokens`) and knows each marker as an added token,
    whose id is then swapped for the special token's.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        added = tokenizer.get_added_tokens_decoder()
        # longest first: where two special tokens start at one place, the longer one is meant
        self.specials = sorted(
            ((token, token_id) for token_id, token in added.items() if token.special),
            key=lambda pair: -len(pair[0].content),
        )
        self._plain = _copy(tokenizer)
        self._plain.encode_special_tokens = True
        self._marked: dict[str, tuple[Tokenizer, dict[int, int]]] = {}

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text: special-token strings in it are ordinary characters."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> tuple[str, list[int]]:
        """(prompt text, token ids): special tokens only where the template writes them."""
        template = self._template()
        mark = _free_mark([template, *_strings(messages), *_strings(extra)])
        markers = {
            token.content: f"{mark}{chr(_FIRST + k)}{mark}"
            for k, (token, _) in enumerate(self.specials)
        }
        variables = {
            name: markers.get(value, value) if value is not None else None
            for name, value in self.named.items()
        }
        marked = render_chat(
            _replace_all(
                template, {k: v for k, v in markers.items() if not _UNSAFE_IN_SOURCE.search(k)}
            ),
            messages,
            add_generation_prompt=add_generation_prompt,
            **variables,
            **extra,
        )
        tokenizer, to_special = self._marked_tokenizer(mark, markers)
        ids = [to_special.get(i, i) for i in tokenizer.encode(marked, add_special_tokens=False).ids]
        text = _replace_all(marked, {marker: token for token, marker in markers.items()})
        return text, ids

    def _template(self) -> str:
        if self.template is None:
            raise ValueError("this model has no chat template")
        return self.template

    def _marked_tokenizer(
        self, mark: str, markers: dict[str, str]
    ) -> tuple[Tokenizer, dict[int, int]]:
        """The plain tokenizer plus one added token per marker; marker id -> special token id."""
        if mark not in self._marked:
            tokenizer = _copy(self._plain)
            tokenizer.encode_special_tokens = True
            to_special = {}
            for token, token_id in self.specials:
                marker = markers[token.content]
                tokenizer.add_tokens(
                    [
                        AddedToken(
                            marker,
                            single_word=token.single_word,
                            lstrip=token.lstrip,
                            rstrip=token.rstrip,
                            normalized=False,
                            special=False,
                        )
                    ]
                )
                to_special[tokenizer.token_to_id(marker)] = token_id
            self._marked[mark] = (tokenizer, to_special)
        return self._marked[mark]


def _copy(tokenizer: Tokenizer) -> Tokenizer:
    return Tokenizer.from_str(tokenizer.to_str())


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON-like value (keys and values)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _free_mark(texts: list[str]) -> str:
    """A private-use character that occurs in none of `texts`."""
    used = set().union(*(set(t) for t in texts)) if texts else set()
    for code in _MARKS:
        if chr(code) not in used:
            return chr(code)
    raise ValueError("the conversation uses every private-use character")


def _replace_all(text: str, replacements: dict[str, str]) -> str:
    """Every key of `replacements` in `text` replaced in one left-to-right pass (longest first)."""
    if not replacements:
        return text
    pattern = re.compile(
        "|".join(re.escape(k) for k in sorted(replacements, key=len, reverse=True))
    )
    return pattern.sub(lambda m: replacements[m.group(0)], text)
