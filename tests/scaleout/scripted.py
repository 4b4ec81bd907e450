"""A scripted engine for worker tests: the test decides when each piece is generated."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from bot.engine import GenerationResult, SamplingParams


class ScriptedStream:
    """An engine stream whose pieces the test feeds (`feed`, `end`)."""

    def __init__(self, prompt: list[int], params: SamplingParams, model: str) -> None:
        self.prompt, self.params, self.model = prompt, params, model
        self.result: GenerationResult | None = None
        self.cancelled = False
        self.text = ""  # read so far
        self.fed = ""
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._done = asyncio.Event()

    def feed(self, *pieces: str) -> None:
        for piece in pieces:
            self.fed += piece
            self._queue.put_nowait(piece)

    def end(self, reason: str = "stop") -> None:
        """The end after the pieces fed so far (a cancel: after those already read)."""
        if self.result is None:
            text = self.text if reason == "cancelled" else self.fed
            self.result = GenerationResult(
                token_ids=list(range(len(text))),
                text=text,
                finish_reason=reason,
                prompt_tokens=len(self.prompt),
                completion_tokens=len(text),
                model=self.model,
            )
            self._queue.put_nowait(None)
            self._done.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.end("cancelled")

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> str:
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                raise StopAsyncIteration
            if not self.cancelled:
                self.text += item
                return item

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> GenerationResult:
        await self._done.wait()
        assert self.result is not None
        return self.result


class ScriptedEngine:
    """The part of the Engine API a worker uses; streams wait for the test."""

    def __init__(self, ref: str = "tiny@1", slots: int = 4) -> None:
        self.model = SimpleNamespace(ref=ref)
        self.slots = slots
        self.streams: list[ScriptedStream] = []
        self.swaps: list[str] = []
        self._new = asyncio.Condition()

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(slots=self.slots, model=self.model.ref, provider="cpu")

    def submit(self, prompt, params, timeout_s=None) -> ScriptedStream:
        stream = ScriptedStream(list(prompt), params, self.model.ref)
        self.streams.append(stream)
        asyncio.get_running_loop().create_task(self._notify())
        return stream

    async def _notify(self) -> None:
        async with self._new:
            self._new.notify_all()

    async def stream(self, index: int) -> ScriptedStream:
        """The index-th submitted stream, once submitted."""
        async with self._new:
            await self._new.wait_for(lambda: len(self.streams) > index)
        return self.streams[index]

    async def swap(self, ref: str) -> SimpleNamespace:
        self.swaps.append(ref)
        self.model = SimpleNamespace(ref=ref)
        return self.model
