"""The public Engine: load a version, submit requests, stream text, hot-swap versions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bot.engine.detokenize import IncrementalDetokenizer, StopStrings
from bot.engine.loader import LoadedModel, load_model
from bot.engine.sampling import Sampler
from bot.engine.scheduler import Request, Scheduler, Worker
from bot.engine.session import GraphRunner, SessionInfo, create_session
from bot.engine.stream import Stream
from bot.engine.types import EngineStats, GenerationResult, SamplingParams, check_prompt

log = logging.getLogger(__name__)

WrapRunner = Callable[[GraphRunner], GraphRunner]  # a test seam: see Engine.start


def _load_worker(
    ref: str | Path | None,
    registry: str | Path | None,
    device: str,
    slots: int,
    threads: int | None,
    spin: bool = False,
    wrap_runner: WrapRunner | None = None,
) -> Worker:
    model = load_model(ref, registry)
    session, info = create_session(
        model.graph_path, device, threads, spin, precision=model.manifest.precision
    )
    runner = GraphRunner(session, info, slots)
    return Worker(model, wrap_runner(runner) if wrap_runner else runner)


class Engine:
    """Runs one model version (two during a hot swap) for many concurrent asyncio callers.

    `await Engine.start(ref, ...)`, then `engine.submit(prompt_ids, params)` from the event loop.
    """

    def __init__(
        self,
        worker: Worker,
        *,
        registry: str | Path | None,
        device: str,
        slots: int,
        max_queue: int,
        threads: int | None,
        spin: bool,
        prefill_chunk: int,
        wrap_runner: WrapRunner | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._registry, self._device, self._slots, self._threads = registry, device, slots, threads
        self._spin, self._wrap_runner, self._clock = spin, wrap_runner, clock
        self._closing = False
        self._scheduler = Scheduler(
            worker, max_queue=max_queue, prefill_chunk=prefill_chunk, clock=clock
        )

    @classmethod
    async def start(
        cls,
        ref: str | Path | None = None,
        *,
        registry: str | Path | None = None,
        device: str = "auto",
        slots: int = 8,
        max_queue: int = 64,
        threads: int | None = None,
        spin: bool = False,
        prefill_chunk: int = 256,
        wrap_runner: WrapRunner | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Engine:
        """Load `ref` (NAME, NAME@N, a folder; None: the registry's active version).

        `threads`: CPU intra-op threads (default: the cores this process may use); `spin`: let
        idle ORT workers spin (faster only on a dedicated machine); `prefill_chunk`: prompt tokens
        fed per engine step, so long prompts do not stall running streams.
        Test seams: `wrap_runner` wraps the graph runner of every version loaded (to watch, block
        or fail its steps); `clock` replaces `time.perf_counter` for deadlines and timings.
        """
        if slots < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("slots, max_queue and prefill_chunk must be >= 1")
        worker = await asyncio.to_thread(
            _load_worker, ref, registry, device, slots, threads, spin, wrap_runner
        )
        return cls(
            worker,
            registry=registry,
            device=device,
            slots=slots,
            max_queue=max_queue,
            threads=threads,
            spin=spin,
            prefill_chunk=prefill_chunk,
            wrap_runner=wrap_runner,
            clock=clock,
        )

    @property
    def model(self) -> LoadedModel:
        """The version new requests go to."""
        return self._scheduler.current.model

    @property
    def session_info(self) -> SessionInfo:
        """Which provider runs the current version (cuda/cpu) and with how many threads."""
        return self._scheduler.current.runner.info

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the current version's KV buffers (all slots, every layer)."""
        return self._scheduler.current.runner.kv_bytes

    @property
    def precision(self) -> str:
        return self.model.manifest.precision

    def stats(self) -> EngineStats:
        """Queue depth, busy KV slots and what runs, right now (safe to call from the loop)."""
        queued, active = self._scheduler.load()
        worker = self._scheduler.current
        return EngineStats(
            queued=queued,
            active=active,
            slots=worker.runner.slots,
            model=worker.model.ref,
            provider=worker.runner.info.provider,
        )

    def submit(
        self,
        prompt_ids: list[int] | np.ndarray,
        params: SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> Stream:
        """Queue one request; call from the event loop. QueueFullError when busy,
        PromptTooLongError when the prompt does not fit, EngineClosedError once the engine
        thread has been told to stop (so a refusal means no further step), ValueError on bad
        ids. Callers that must not start anything while close() runs check `closed` first."""
        loop = asyncio.get_running_loop()
        params = params or SamplingParams()
        worker = self._scheduler.current
        model = worker.model
        prompt = np.asarray(list(prompt_ids), dtype=np.int64)
        if prompt.ndim != 1:
            raise ValueError("the prompt must be a non-empty list of token ids")
        check_prompt(
            prompt.tolist(),
            vocab=worker.runner.vocab,
            max_context=model.max_context,
            max_new_tokens=params.max_new_tokens,
        )
        stop_ids = model.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids
        now = self._clock()
        request: Request
        stream = Stream(loop, lambda: self._scheduler.cancel(request))
        request = Request(
            prompt=prompt,
            params=params,
            stream=stream,
            worker=worker,
            sampler=Sampler(params, prompt.tolist(), () if params.ignore_eos else stop_ids),
            detok=IncrementalDetokenizer(model.tokenizer),
            stops=StopStrings(params.stop),
            stop_ids=frozenset(stop_ids),
            submitted=now,
            deadline=now + timeout_s if timeout_s else None,
        )
        self._scheduler.submit(request)
        return stream

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams | None = None, **kw
    ) -> GenerationResult:
        """Submit and wait for the whole result."""
        return await self.submit(prompt_ids, params, **kw).collect()

    async def swap(self, ref: str | Path) -> LoadedModel:
        """Load `ref` beside the current version; new requests go to it, in-flight ones finish
        on the old one, which is then released."""
        worker = await asyncio.to_thread(
            _load_worker,
            ref,
            self._registry,
            self._device,
            self._slots,
            self._threads,
            self._spin,
            self._wrap_runner,
        )
        old = self._scheduler.add_worker(worker)
        log.info("engine: swapped %s -> %s", old.model.ref, worker.model.ref)
        return worker.model

    @property
    def closed(self) -> bool:
        """True once close() has begun: submit() raises EngineClosedError from then on."""
        return self._closing

    async def close(self) -> None:
        """Stop the engine thread; unfinished requests end as cancelled."""
        self._closing = True
        await asyncio.to_thread(self._scheduler.stop)
