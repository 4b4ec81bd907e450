"""A scripted engine for worker tests: the test decides when each piece is generated."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from bot.engine import GenerationResult, SamplingParams
from bot.engine.stream import PieceStream


class ScriptedStream(PieceStream):
    """An engine stream whose pieces the test feeds (`feed`, `end`); after a cancel, pieces fed
    but not yet read are dropped, as the engine drops what it had not handed over."""

    def __init__(self, prompt: list[int], params: SamplingParams, model: str) -> None:
        super().__init__()
        self.prompt, self.params, self.model = prompt, params, model
        self.cancelled = False
        self.text = ""  # read so far
        self.fed = ""

    def feed(self, *pieces: str) -> None:
        for piece in pieces:
            self.fed += piece
            self._queue.put_nowait(piece)

    def end(self, reason: str = "stop") -> None:
        """The end after the pieces fed so far (a cancel: after those already read)."""
        text = self.text if reason == "cancelled" else self.fed
        self._finish(
            GenerationResult(
                token_ids=list(range(len(text))),
                text=text,
                finish_reason=reason,
                prompt_tokens=len(self.prompt),
                completion_tokens=len(text),
                model=self.model,
            )
        )

    def cancel(self) -> None:
        self.cancelled = True
        self.end("cancelled")

    async def __anext__(self) -> str:
        while True:
            piece = await super().__anext__()
            if not self.cancelled:
                self.text += piece
                return piece


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
