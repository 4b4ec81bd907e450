"""The one generation interface of the bot (GenerationBackend) and the values it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from bot.engine import GenerationResult, LoadedModel, SamplingParams


class RestartPiece(str):
    """A piece that starts the reply over: the text streamed before it is void (the worker that
    was writing it died and another one generates the whole reply again). Its own text (possibly
    empty) is the first piece of the new reply. Only distributed backends send it."""

    __slots__ = ()


@runtime_checkable
class ReplyStream(Protocol):
    """Text pieces of one request as they are generated; `result` once it has ended."""

    result: GenerationResult | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    def cancel(self) -> None:
        """Stop generating; the result's finish_reason becomes "cancelled" (unless done)."""

    @property
    def done(self) -> bool: ...

    async def wait(self) -> GenerationResult: ...

    async def collect(self) -> GenerationResult: ...


@dataclass(frozen=True)
class WorkerInfo:
    """One inference worker as its last heartbeat described it."""

    id: str
    model: str  # NAME@N it holds for new requests
    provider: str  # "cuda" or "cpu"
    slots: int
    busy: int  # requests it is generating now
    tokens_per_s: float  # completion tokens per second over its recent past
    age_s: float = 0.0  # seconds since that heartbeat


@dataclass(frozen=True)
class BackendStats:
    """Load across everything that generates for this bot, for /stats and monitoring."""

    queued: int  # requests waiting for a KV slot (for Redis: not yet taken by any worker)
    active: int  # requests being generated
    slots: int  # KV slots in all (for Redis: over the live workers)
    model: str  # NAME@N new requests are pinned to
    provider: str  # "cuda", "cpu", or for Redis the workers' providers
    workers: tuple[WorkerInfo, ...] = field(default_factory=tuple)  # empty for the local engine


@runtime_checkable
class GenerationBackend(Protocol):
    """What the conversation logic needs from generation; the local engine or remote workers.

    `model` is the version new requests are pinned to (its tokenizer and chat template build the
    prompt). `submit` raises QueueFullError when busy, PromptTooLongError when the prompt does
    not fit, ValueError on bad ids, EngineError when the backend cannot take requests.
    """

    @property
    def model(self) -> LoadedModel: ...

    @property
    def closed(self) -> bool:
        """True once close() began (new requests are refused with EngineClosedError)."""
        ...

    async def refresh(self) -> LoadedModel:
        """`model` as it is now (another process may have pinned another version)."""
        ...

    async def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> ReplyStream: ...

    async def swap(self, ref: str | Path) -> LoadedModel:
        """Pin new requests to `ref`; in-flight ones finish on the version they started on."""
        ...

    async def stats(self) -> BackendStats: ...

    async def close(self) -> None:
        """Stop; unfinished streams end as cancelled."""
        ...
