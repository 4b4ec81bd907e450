"""Stream reply text into Discord messages: post, throttled edits, code-block-safe splits."""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import discord

from bot.backends.base import RestartPiece

MAX_LEN = 2000
MIN_LEN = 100  # the smallest limit split_message accepts: room for a reopened fence and text
FENCE = "```"
CLOSE = "\n" + FENCE  # added at the end of a chunk whose code block is still open
MAX_LANG = 32  # longest language tag carried into a reopened fence; a longer one reopens bare
_FENCE_RE = re.compile(r"```(\w*)")
_LOOKBACK = 16  # at most this many characters back from a hard cut to keep an emoji whole
BLANK = "\u200b"  # Discord refuses a message of only whitespace: such a chunk starts with this


def postable(chunk: str) -> str:
    """The chunk as Discord accepts it: one of only whitespace gets a zero-width first character."""
    return chunk if chunk.strip() else BLANK + chunk[1:]


def reopen_marker(lang: str) -> str:
    """What starts a chunk that continues an open code block of language `lang`."""
    return f"{FENCE}{lang if len(lang) <= MAX_LANG else ''}\n"


def _joins_previous(ch: str) -> bool:
    """A character that belongs to the grapheme before it (combining mark, ZWJ, variation
    selector, skin tone, tag)."""
    o = ord(ch)
    return (
        unicodedata.category(ch) in ("Mn", "Mc", "Me")
        or o == 0x200D
        or 0xFE00 <= o <= 0xFE0F
        or 0x1F3FB <= o <= 0x1F3FF
        or 0xE0020 <= o <= 0xE007F
        or 0xE0100 <= o <= 0xE01EF
    )


def _grapheme_cut(text: str, cut: int, floor: int) -> int:
    """`cut` moved back (a little, never to `floor`) so it does not split an emoji or a letter
    from its accents; `cut` itself when no such point is near."""
    c = cut
    while c > floor + 1 and cut - c < _LOOKBACK:
        if not (_joins_previous(text[c]) or text[c - 1] == "\u200d"):
            return c
        c -= 1
    return cut


class Part(NamedTuple):
    """One message of a split text: `chunk` is reopen_marker (when a code block was open at
    `start`) + text[start:end] + CLOSE (when one is open at `end` and the chunk is not the last)."""

    chunk: str
    start: int
    end: int
    next_start: int  # end, or end + 1 where the chunk was cut at a line break or space
    open_lang: str | None  # the language of a code block open at `end`, else None


def message_parts(text: str, limit: int, start: int = 0, lang: str | None = None) -> Iterator[Part]:
    """The chunks of text[start:] (`lang`: a code block open at `start`), each of at most
    `limit` characters. Each chunk makes progress, and each costs O(limit): linear in the text.

    Fences are the regex matches of _FENCE_RE over the text, taken once from `start`; a hard cut
    never falls inside a "```" (it moves before it), so each chunk sees the same fences as the
    whole text does and the chunks' code blocks open and close as the text's do.
    """
    if limit < MIN_LEN:
        raise ValueError(f"messages need a limit of at least {MIN_LEN} characters")
    fences = _FENCE_RE.finditer(text, start)
    fence = next(fences, None)
    pos, n = start, len(text)
    while True:
        reopen = "" if lang is None else reopen_marker(lang)
        if len(reopen) + n - pos <= limit:
            yield Part(reopen + text[pos:], pos, n, n, None)  # the last: nothing resumes from it
            return
        room = limit - len(reopen) - len(CLOSE)
        # the last line break, else space, in the second half of reach; else in all of it (a
        # short chunk); else a hard cut
        for sep, low in (("\n", room // 2), (" ", room // 2), ("\n", 1), (" ", 1)):
            cut = text.rfind(sep, pos + low, pos + room + 1)
            if cut > pos:
                next_start = cut + 1
                break
        else:
            cut = _grapheme_cut(text, pos + room, pos)
            next_start = cut
        while fence is not None and fence.start() < cut:
            if fence.start() > pos and cut < fence.end() and next_start == cut:
                cut = next_start = fence.start()  # a hard cut inside a fence: cut before it
                break
            lang = fence.group(1) if lang is None else None
            fence = next(fences, None)
        close = "" if lang is None else CLOSE
        yield Part(reopen + text[pos:cut] + close, pos, cut, next_start, lang)
        pos = next_start


def split_message(text: str, limit: int = MAX_LEN) -> list[str]:
    """Split text into messages of at most `limit` characters, at a line break or space where
    one is in reach (the one cut at is dropped), else between two characters (keeping emoji whole
    where it can); in linear time for any text.

    A code block still open at the end of a chunk is closed there (CLOSE) and reopened at the
    start of the next (reopen_marker, same language). So each chunk is reopen marker (or "") +
    a slice of the text + CLOSE (or ""), as `message_parts` tells; the slices, in order, are the
    text less the dropped separators. Every chunk but the last has its fences balanced; the last
    is balanced when the text is.
    """
    return [part.chunk for part in message_parts(text, limit)]


class Splitter:
    """split_message of a text that only grows, in time linear in its final length: chunks
    before the last never change as text is appended, so they are kept and not split again."""

    def __init__(self, limit: int = MAX_LEN) -> None:
        if limit < MIN_LEN:
            raise ValueError(f"a Splitter needs a limit of at least {MIN_LEN} characters")
        self.limit = limit
        self._done: list[str] = []  # the final chunks
        self._start = 0  # where the rest of the text starts
        self._lang: str | None = None  # the code block open there, if any

    def split(self, text: str) -> list[str]:
        """split_message(text, limit); `text` must extend every text given before."""
        parts = list(message_parts(text, self.limit, self._start, self._lang))
        for part in parts[:-1]:
            self._done.append(part.chunk)
            self._start, self._lang = part.next_start, part.open_lang
        return [*self._done, parts[-1].chunk]


class StreamedReply:
    """Posts the first piece, edits at most once per interval, continues past the limit.

    `view`: components for the first message (a stop button). `reuse`: messages of an earlier
    answer to write over, in order, before posting new ones (a regenerated or continued reply);
    `drop_unused()` deletes those the new text did not need. `held`: a placeholder shown
    earlier (hold()), written over by the first text."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        edit_interval_s: float = 1.0,
        reference: discord.Message | None = None,
        clock: Callable[[], float] = time.monotonic,
        view: discord.ui.View | None = None,
        reuse: Sequence[Any] = (),
        held: Any = None,
    ) -> None:
        self.channel = channel
        self.view = view
        self._reuse = [*([held] if held is not None else []), *reuse]
        self.edit_interval_s = edit_interval_s
        self.reference = reference
        self.clock = clock
        self.text = ""
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []
        self._last_edit = 0.0
        self._splitter = Splitter()
        self._visible = False  # any text besides whitespace yet
        self._held: Any = held  # a placeholder shown before any text (see hold())
        self._lock = asyncio.Lock()  # one change to Discord at a time (hold() runs beside push())

    @property
    def message_ids(self) -> list[int]:
        """The reply's messages; before any text, the placeholder if one is shown."""
        ids = [m.id for m in self.messages]
        return ids if ids or self._held is None else [self._held.id]

    async def hold(self, text: str) -> Any:
        """Post `text` as a placeholder unless something is shown already; the reply's first
        text is then written over it (not posted beside it), and `drop_unused()` deletes it if
        no text came. Returns the placeholder message, or None."""
        async with self._lock:
            if self.messages or self._reuse or self._visible:
                return None
            self._held = await self._send(postable(text))
            self._reuse.append(self._held)
            return self._held

    async def push(self, piece: str) -> None:
        """Add a piece of text; updates Discord if the edit interval allows. A RestartPiece
        starts the text over (another worker generates the reply again): the messages already
        shown are edited to the new text, not added to."""
        if isinstance(piece, RestartPiece):
            self.text, self._visible, self._splitter = "", False, Splitter()
        self.text += piece
        self._visible = self._visible or bool(piece.strip())
        await self._sync(force=False)

    async def finish(self, suffix: str = "") -> None:
        """Show the final text (plus an optional note such as an apology)."""
        self.text += suffix
        self._visible = self._visible or bool(suffix.strip())
        await self._sync(force=True)

    async def _sync(self, *, force: bool) -> None:
        async with self._lock:
            await self._sync_locked(force=force)

    async def _sync_locked(self, *, force: bool) -> None:
        if not self._visible:
            return
        chunks = self._splitter.split(self.text)
        due = force or self.clock() - self._last_edit >= self.edit_interval_s
        for i, chunk in enumerate(chunks):
            is_last = i == len(chunks) - 1
            if i >= len(self.messages):
                await self._post(chunk)
            elif self._shown[i] != chunk and (due or not is_last):
                await self.messages[i].edit(
                    content=postable(chunk), allowed_mentions=discord.AllowedMentions.none()
                )
                self._shown[i] = chunk
                self._last_edit = self.clock()
        while force and len(self.messages) > len(chunks):  # a restarted reply came out shorter
            await self.messages.pop().delete()
            self._shown.pop()

    async def _post(self, chunk: str) -> None:
        self.messages.append(await self._send(postable(chunk)))
        self._shown.append(chunk)
        self._last_edit = self.clock()

    async def _send(self, chunk: str) -> Any:
        """A new message holding `chunk` (anything with `.id` and `.edit(content=...)`)."""
        kwargs: dict[str, Any] = {"allowed_mentions": discord.AllowedMentions.none()}
        if self.view is not None and not self.messages:
            kwargs["view"] = self.view
        if self._reuse:
            return await self._reuse.pop(0).edit(content=chunk, **kwargs)
        if self.reference is not None and not self.messages:
            kwargs["reference"] = self.reference
            kwargs["mention_author"] = False
        return await self.channel.send(chunk, **kwargs)

    async def set_view(self, index: int, view: discord.ui.View | None) -> None:
        """Put `view` on message `index` (None: take its components off), its text as shown."""
        await self.messages[index].edit(
            content=postable(self._shown[index]),
            view=view,
            allowed_mentions=discord.AllowedMentions.none(),
        )

    async def drop_unused(self) -> None:
        """Delete the messages given to reuse that the text did not need."""
        async with self._lock:
            unused, self._reuse = self._reuse, []
            if self._held in unused:
                self._held = None
            for message in unused:
                await message.delete()


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
