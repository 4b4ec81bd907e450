"""A thinking model's `<think>…</think>` block kept apart from the reply shown and stored."""

from __future__ import annotations

import dataclasses
from typing import Any

from bot.backends.base import RestartPiece

OPEN, CLOSE = "<think>", "</think>"
SHOWN_MAX = 1500  # characters of thinking shown in a spoiler note (a Discord message holds 2000)


def opens_thinking(prompt_text: str) -> bool:
    """The template opened the block itself: the reply starts inside it."""
    return prompt_text.rstrip().endswith(OPEN)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (held back until
    the next piece says whether the tag follows)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """Feeds streamed text; returns what may be shown. A block counts only at the very start
    of the reply (after white space), so `<think>` written later in an answer is just text.

    `thinking` holds the block's text; `unfinished` is true while the block is still open (a
    reply that ends so hit its length limit before answering)."""

    def __init__(self, inside: bool = False) -> None:
        self.state = "inside" if inside else "start"  # start | inside | after
        self.thinking = ""
        self._held = ""

    @property
    def unfinished(self) -> bool:
        return self.state == "inside"

    def feed(self, piece: str) -> str:
        text, self._held = self._held + piece, ""
        shown: list[str] = []
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if stripped.startswith(OPEN):
                    self.state, text = "inside", stripped[len(OPEN) :]
                elif OPEN.startswith(stripped):  # only white space, or part of the tag so far
                    self._held = text
                    return "".join(shown)
                else:
                    self.state = "after"
            elif self.state == "inside":
                end = text.find(CLOSE)
                if end < 0:
                    keep = _partial_suffix(text, CLOSE)
                    self.thinking += text[: len(text) - keep]
                    self._held = text[len(text) - keep :]
                    return "".join(shown)
                self.thinking += text[:end]
                self.state, text = "after", text[end + len(CLOSE) :].lstrip()
                if not text:  # the answer's first piece may still begin with white space
                    self.state = "answer-start"
            elif self.state == "answer-start":
                text = text.lstrip()
                if text:
                    self.state = "after"
            else:
                shown.append(text)
                text = ""
        return "".join(shown)

    def flush(self) -> str:
        """What is still held at the end of the reply."""
        held, self._held = self._held, ""
        if self.state == "inside":
            self.thinking += held
            return ""
        return "" if self.state in ("start", "answer-start") and not held.strip() else held


class ThinkingStream:
    """A reply stream that yields only the answer; `thinking` and `unfinished` as the
    splitter's, and `result` with the answer alone as its text (what is stored)."""

    def __init__(self, inner: Any, inside: bool = False) -> None:
        self._inner, self._inside = inner, inside
        self._split = ThinkingSplitter(inside)
        self._shown = ""

    def __getattr__(self, name: str) -> Any:  # cancel, done, wait, ...
        return getattr(self._inner, name)

    @property
    def thinking(self) -> str:
        return self._split.thinking.strip()

    @property
    def unfinished(self) -> bool:
        return self._split.unfinished

    @property
    def result(self) -> Any:
        result = self._inner.result
        if result is None:
            return None
        return dataclasses.replace(result, text=self._shown)

    async def wait(self) -> Any:
        await self._inner.wait()
        return self.result

    async def collect(self) -> Any:
        async for _ in self:
            pass
        return await self.wait()

    async def __aiter__(self):
        async for piece in self._inner:
            if isinstance(piece, RestartPiece):  # another worker starts the reply over
                self._split = ThinkingSplitter(self._inside)
                self._shown = self._split.feed(str(piece))
                yield RestartPiece(self._shown)
                continue
            shown = self._split.feed(piece)
            if shown:
                self._shown += shown
                yield shown
        rest = self._split.flush()
        if rest:
            self._shown += rest
            yield rest


def spoiler_note(thinking: str) -> str:
    """The thinking as a Discord spoiler (cut to fit under a reply); `||` inside is broken so
    the model's text cannot end the spoiler early."""
    text = " ".join(thinking.split()).replace("||", "| |")
    if len(text) > SHOWN_MAX:
        text = text[: SHOWN_MAX - 1] + "…"
    return f"thought: ||{text}||"


def thinking_notes(stream: Any, show: str) -> list[str]:
    """Notes under a reply of a thinking model: that it ran out of tokens while still thinking,
    and (SHOW_THINKING=spoiler) the thinking itself."""
    notes = []
    if getattr(stream, "unfinished", False):
        notes.append("it was still thinking: raise max_tokens, or turn THINKING off")
    thought = getattr(stream, "thinking", "")
    if show == "spoiler" and isinstance(thought, str) and thought:
        notes.append(spoiler_note(thought))
    return notes
