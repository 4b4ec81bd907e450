"""Stream reply text into Discord messages: post, throttled edits, code-block-safe splits."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import discord

MAX_LEN = 2000
FENCE = "```"
_FENCE_RE = re.compile(r"```(\w*)")


def _open_fence(text: str) -> str | None:
    """The language of a code fence still open at the end of text ('' for none given), else None."""
    lang: str | None = None
    for m in _FENCE_RE.finditer(text):
        lang = m.group(1) if lang is None else None
    return lang


def _cut_point(text: str, budget: int, floor: int) -> tuple[int, int]:
    """(end of this chunk, start of the next): at the last newline, else space, else a hard cut."""
    for sep in ("\n", " "):
        i = text.rfind(sep, floor, budget + 1)
        if i > floor:
            return i, i + 1
    return budget, budget


def split_message(text: str, limit: int = MAX_LEN) -> list[str]:
    """Split text into messages of at most limit chars, never inside a word; code fences are
    closed at the end of a chunk and reopened (same language) at the start of the next."""
    chunks: list[str] = []
    reopen = ""
    rest = text
    while True:
        body = reopen + rest
        if len(body) <= limit:
            chunks.append(body)
            return chunks
        end, start = _cut_point(body, limit - len(FENCE) - 1, len(reopen))
        head, rest = body[:end], body[start:]
        lang = _open_fence(head)
        if lang is not None:
            head += "\n" + FENCE
            reopen = f"{FENCE}{lang}\n"
        else:
            reopen = ""
        chunks.append(head)


class StreamedReply:
    """Posts the first piece, edits at most once per interval, continues past the limit."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        edit_interval_s: float = 1.0,
        reference: discord.Message | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.edit_interval_s = edit_interval_s
        self.reference = reference
        self.clock = clock
        self.text = ""
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []
        self._last_edit = 0.0

    @property
    def message_ids(self) -> list[int]:
        return [m.id for m in self.messages]

    async def push(self, piece: str) -> None:
        """Add a piece of text; updates Discord if the edit interval allows."""
        self.text += piece
        await self._sync(force=False)

    async def finish(self, suffix: str = "") -> None:
        """Show the final text (plus an optional note such as an apology)."""
        self.text += suffix
        await self._sync(force=True)

    async def _sync(self, *, force: bool) -> None:
        if not self.text.strip():
            return
        chunks = split_message(self.text)
        due = force or self.clock() - self._last_edit >= self.edit_interval_s
        for i, chunk in enumerate(chunks):
            is_last = i == len(chunks) - 1
            if i >= len(self.messages):
                await self._post(chunk)
            elif self._shown[i] != chunk and (due or not is_last):
                await self.messages[i].edit(
                    content=chunk, allowed_mentions=discord.AllowedMentions.none()
                )
                self._shown[i] = chunk
                self._last_edit = self.clock()

    async def _post(self, chunk: str) -> None:
        self.messages.append(await self._send(chunk))
        self._shown.append(chunk)
        self._last_edit = self.clock()

    async def _send(self, chunk: str) -> Any:
        """A new message holding `chunk` (anything with `.id` and `.edit(content=...)`)."""
        kwargs: dict[str, Any] = {"allowed_mentions": discord.AllowedMentions.none()}
        if self.reference is not None and not self.messages:
            kwargs["reference"] = self.reference
            kwargs["mention_author"] = False
        return await self.channel.send(chunk, **kwargs)


class InteractionReply(StreamedReply):
    """The same streaming into a deferred slash command's answer: its original response holds the
    first part, follow-ups (ephemeral too when asked) hold what goes past the limit."""

    def __init__(
        self,
        interaction: discord.Interaction,
        *,
        ephemeral: bool = False,
        edit_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        channel = interaction.channel  # unused: parts go through the interaction's webhook
        super().__init__(channel, edit_interval_s=edit_interval_s, clock=clock)  # type: ignore[arg-type]
        self.interaction, self.ephemeral = interaction, ephemeral

    async def _send(self, chunk: str) -> Any:
        none = discord.AllowedMentions.none()
        if not self.messages:
            return await self.interaction.edit_original_response(
                content=chunk, allowed_mentions=none
            )
        return await self.interaction.followup.send(
            chunk, ephemeral=self.ephemeral, allowed_mentions=none, wait=True
        )
