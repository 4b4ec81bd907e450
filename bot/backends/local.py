"""LocalBackend: the in-process Engine behind the GenerationBackend interface (the default)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.backends.base import BackendStats
from bot.engine import Engine, LoadedModel, SamplingParams, Stream


class LocalBackend:
    """Generation in this process: one Engine, its KV slots and its queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    async def start(cls, ref: str | Path | None = None, **engine_options: Any) -> LocalBackend:
        """Load `ref` (None: the active version) with `Engine.start`'s options."""
        return cls(await Engine.start(ref, **engine_options))

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    @property
    def closed(self) -> bool:
        """True once close() began: new requests are refused (EngineClosedError)."""
        return self.engine.closed

    async def refresh(self) -> LoadedModel:
        return self.engine.model

    async def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> Stream:
        return self.engine.submit(list(prompt_ids), params, timeout_s=timeout_s)

    async def swap(self, ref: str | Path) -> LoadedModel:
        return await self.engine.swap(ref)

    async def stats(self) -> BackendStats:
        s = self.engine.stats()
        return BackendStats(s.queued, s.active, s.slots, s.model, s.provider)

    async def close(self) -> None:
        await self.engine.close()
