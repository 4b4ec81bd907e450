"""The asyncio side of a request: an async iterator of text pieces fed from the engine thread."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from bot.engine.types import GenerationResult

_END = object()


class PieceStream:
    """Text pieces of one request as they arrive, on the event loop; `result` once it has ended.
    The consumer's side of every stream (the engine's, a Redis reply's): `async for piece in
    stream`, `wait()`, `collect()`; a producer calls `_finish(result)` once."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        self.result: GenerationResult | None = None

    def _finish(self, result: GenerationResult) -> None:
        if self._done.is_set():
            return
        self.result = result
        self._queue.put_nowait(_END)
        self._done.set()

    def __aiter__(self) -> PieceStream:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends at once
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> GenerationResult:
        """Wait for the end without reading the pieces; the final result."""
        await self._done.wait()
        assert self.result is not None
        return self.result

    async def collect(self) -> GenerationResult:
        """Read every piece, then return the result."""
        async for _ in self:
            pass
        return await self.wait()


class Stream(PieceStream):
    """The engine's stream: the engine thread hands pieces and the result over through an
    `Outbox`; `cancel()` asks the engine to stop and free the slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]) -> None:
        super().__init__()
        self._loop = loop
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop generating; the result's finish_reason becomes "cancelled" (unless done)."""
        self._on_cancel()


class Outbox:
    """What one engine step hands to the event loops: every stream's pieces and results, in
    order, delivered with one `call_soon_threadsafe` per loop per step (not one per token)."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.AbstractEventLoop, list[tuple[Callable, object]]] = {}

    def push(self, stream: Stream, piece: str) -> None:
        self._calls.setdefault(stream._loop, []).append((stream._queue.put_nowait, piece))

    def finish(self, stream: Stream, result: GenerationResult) -> None:
        self._calls.setdefault(stream._loop, []).append((stream._finish, result))

    def flush(self) -> None:
        """Hand everything collected so far to its loop (engine thread; cheap when empty)."""
        if not self._calls:
            return
        calls, self._calls = self._calls, {}
        for loop, batch in calls.items():
            with contextlib.suppress(RuntimeError):  # the consumer's loop closed: nobody listens
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Callable, object]]) -> None:
    for fn, arg in batch:
        fn(arg)
