"""Reply: one streamed reply, stored as it goes; the per-channel line replies wait in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.backends.base import RestartPiece
from bot.errors import (
    GenerationFailedError,
    ReplyCutError,
    ReplyError,
    RestartingError,
)
from bot.storage import repo
from bot.storage.models import Status
from bot.turns import Prompt

if TYPE_CHECKING:
    from bot.engine import GenerationResult
    from bot.storage.db import Database

log = logging.getLogger(__name__)

PARTIAL_FLUSH_S = 1.0  # how often a streaming reply's partial text is written to the database
RESULT_WAIT_S = 5.0  # how long leaving a cancelled reply waits for the engine's final figures


class ChannelQueues:
    """One FIFO lock per channel (asyncio.Lock wakes waiters in arrival order); idle ones go."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, channel_id: int) -> None:
        lock, users = self._locks.get(channel_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[channel_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._drop(channel_id)
            raise

    def release(self, channel_id: int) -> None:
        self._locks[channel_id][0].release()
        self._drop(channel_id)

    def _drop(self, channel_id: int) -> None:
        lock, users = self._locks[channel_id]
        if users <= 1:
            del self._locks[channel_id]
        else:
            self._locks[channel_id] = (lock, users - 1)


@dataclass
class Started:
    stream: Any  # the engine's stream: async iterator of str, .result, .cancel()
    row_id: int | None  # the assistant row (None: nothing stored, as for ask())
    prompt: Prompt
    prefix: str = ""  # text the stored row keeps before what is generated (a continued reply)
    prefix_tokens: int = 0
    history_cut: bool = False  # the first prompt of the conversation without its oldest turns


class Reply:
    """`async with service.reply(msg, bot=me) as reply: async for piece in reply: ...`

    Entering waits for the channel's turn and submits to the engine (ReplyError if it cannot);
    iterating yields text pieces; leaving stores the outcome (cancelling an unfinished stream).
    """

    def __init__(
        self,
        db: Database,
        start: Callable[[], Awaitable[Started]],
        *,
        channel_id: int,
        queues: ChannelQueues | None,
        accept: Callable[[], Awaitable[None]] | None = None,
        decline: Callable[[], Awaitable[None]] | None = None,
        hold: Callable[[int], Awaitable[None]] | None = None,
        closed: Callable[[], bool] = lambda: False,
        live: dict[int, Reply] | None = None,
    ) -> None:
        self._db = db
        self._live = live  # row id -> reply, while it streams (for stop())
        self._stopped = False
        self._start = start
        self._accept = accept
        self._decline = decline
        self._hold = hold
        self._closed = closed
        self._channel_id = channel_id
        self._queues = queues
        self._started: Started | None = None
        self._finished = False  # the stream ended by itself
        self._failed = False
        self._last_flush = 0.0
        self._t0 = 0.0
        self.message_ids: list[int] = []
        self._flushed_ids: list[int] = []  # the message ids the partial row holds
        self.result: GenerationResult | None = None
        self.text = ""

    @property
    def stream(self) -> Any:
        """The stream the reply reads (None before entering)."""
        return self._started.stream if self._started else None

    @property
    def prompt(self) -> Prompt | None:
        return self._started.prompt if self._started else None

    @property
    def row_id(self) -> int | None:
        """The stored assistant row (None before entering, and for ask())."""
        return self._started.row_id if self._started else None

    @property
    def history_cut(self) -> bool:
        """This is the first reply of its conversation whose prompt left out the oldest turns."""
        return bool(self._started and self._started.history_cut)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """End the reply where it is (a user pressed stop): the text so far stays, stored as
        interrupted with finish reason "stopped"; iterating ends without an error."""
        if self._started is not None and not self._finished:
            self._stopped = True
            self._started.stream.cancel()

    async def __aenter__(self) -> Reply:
        # a place in the channel's line first, so turns follow arrival order, then the message
        # is stored at once, before waiting for the channel's turn
        waiter = None
        if self._queues is not None:
            waiter = asyncio.ensure_future(self._queues.acquire(self._channel_id))
        try:
            if self._accept is not None:
                await self._accept()
            if self._closed():
                await self._restarting()
            if waiter is not None:
                await waiter
        except BaseException:
            if waiter is not None and waiter.done() and not waiter.cancelled():
                if waiter.exception() is None:
                    self._release()
            elif waiter is not None:
                waiter.cancel()
            raise
        try:
            if self._closed():  # it closed while this message waited for its turn
                await self._restarting()
            self._t0 = time.monotonic()
            self._started = await self._start()
            self._last_flush = time.monotonic()
            if self._live is not None and self._started.row_id is not None:
                self._live[self._started.row_id] = self
        except BaseException:
            self._release()
            raise
        return self

    async def hold(self, message_id: int) -> None:
        """Remember the placeholder Discord message shown before any text, so that after a
        crash its answer replaces it: in the inbox row while the message waits its turn; once
        the reply started, as the reply's message, which a restart then marks interrupted."""
        if not self.message_ids:
            self.message_ids.append(message_id)
        if self._started is None:
            if self._hold is not None:
                await self._hold(message_id)
        elif not self._finished:
            await self._flush_partial()

    async def _restarting(self) -> None:
        """The bot is closing before this message's turn: its author is told to ask again
        (RestartingError), so it leaves the inbox."""
        if self._decline is not None:
            await self._decline()
        raise RestartingError("the engine closed before this message's turn")

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._started is None:
            raise RuntimeError("iterate a Reply inside `async with`")
        stream = self._started.stream
        try:
            async for piece in stream:  # a RestartPiece: another worker starts the reply over
                self.text = str(piece) if isinstance(piece, RestartPiece) else self.text + piece
                yield piece
                # a new Discord message is stored at once: after a crash, the next start puts
                # the interrupted note on the message users see
                shown = self.message_ids != self._flushed_ids
                if shown or time.monotonic() - self._last_flush >= PARTIAL_FLUSH_S:
                    await self._flush_partial()
        except ReplyError:
            self._failed = True
            raise
        except Exception as exc:
            self._failed = True
            log.exception("generation failed in channel %s", self._channel_id)
            raise GenerationFailedError(str(exc)) from exc
        self._finished = True
        self.result = stream.result
        if self._stopped:
            return
        reason = self.result.finish_reason if self.result is not None else None
        if reason == "error":
            self._failed = True
            detail = self.result.error or "the engine ended the reply with an error"
            raise GenerationFailedError(detail)
        if reason in ReplyCutError.NOTES:
            raise ReplyCutError(reason)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._started is not None:
                if not self._finished:
                    stream = self._started.stream
                    stream.cancel()
                    # the engine thread delivers the final figures (tokens, timings) shortly
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stream.wait()), RESULT_WAIT_S)
                    self.result = stream.result
                if self._started.row_id is not None:
                    await asyncio.shield(self._store_final())
        finally:
            if self._live is not None and self._started is not None:
                self._live.pop(self._started.row_id or 0, None)
            self._release()

    def _release(self) -> None:
        if self._queues is not None:
            self._queues.release(self._channel_id)
            self._queues = None

    async def _flush_partial(self) -> None:
        if self._started is None or self._started.row_id is None:
            return
        self._last_flush = time.monotonic()
        self._flushed_ids = list(self.message_ids)
        async with self._db.session() as s, s.begin():
            await repo.update_message(
                s,
                self._started.row_id,
                content=self._started.prefix + self.text,
                discord_message_ids=self._flushed_ids,
            )

    async def _store_final(self) -> None:
        assert self._started is not None and self._started.row_id is not None
        result = self.result
        cut = result is not None and result.finish_reason in ReplyCutError.NOTES
        complete = self._finished and not self._failed and not cut and not self._stopped
        reason = result.finish_reason if result is not None else "cancelled"
        if self._failed:
            reason = "error"
        elif self._stopped:
            reason = "stopped"
        elif not complete and reason in (None, "stop", "length"):
            reason = "cancelled"
        text = result.text if complete and result is not None else self.text
        fields: repo.MessageUpdate = {
            "content": self._started.prefix + text,
            "status": Status.COMPLETE if complete else Status.INTERRUPTED,
            "finish_reason": reason,
            "discord_message_ids": self.message_ids,
            "duration_ms": (time.monotonic() - self._t0) * 1000.0,
        }
        if result is not None:
            if result.model:  # the version that actually produced it
                fields["model_version"] = result.model
            fields.update(
                token_count=self._started.prefix_tokens + result.completion_tokens,
                queue_ms=result.queue_ms,
                ttft_ms=result.ttft_ms,
                tokens_per_s=result.tokens_per_s,
            )
        async with self._db.session() as s, s.begin():
            await repo.update_message(s, self._started.row_id, **fields)
