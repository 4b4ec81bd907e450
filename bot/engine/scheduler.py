"""Continuous batching: one engine thread admits, prefills and decodes every active request."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bot.engine.detokenize import IncrementalDetokenizer, StopStrings
from bot.engine.loader import LoadedModel
from bot.engine.sampling import Sampler, choose_batch
from bot.engine.session import GraphRunner
from bot.engine.stream import Outbox, Stream
from bot.engine.types import (
    EngineClosedError,
    GenerationResult,
    QueueFullError,
    SamplingParams,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One generation, from submit to its final result (mutated by the engine thread only,
    except `cancelled`)."""

    prompt: np.ndarray  # int64 token ids
    params: SamplingParams
    stream: Stream
    worker: Worker
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopStrings
    stop_ids: frozenset[int]
    submitted: float
    deadline: float | None
    slot: int | None = None
    cached: int = 0  # tokens in the KV cache
    reused: int = 0  # of which were already there (a prefix kept from an earlier request)
    next_token: int | None = None  # sampled, to be fed by the next decode step
    admitted: float | None = None
    first: float | None = None
    last: float | None = None
    cancelled: bool = False
    done: bool = False
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


MIN_REUSE = 16  # shortest cached prefix worth choosing a slot for


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class Worker:
    """One loaded version: its graph runner and the requests in its KV slots.

    A free slot keeps the KV entries of the last request it served (`kept`: their token ids),
    so a prompt that starts the same way (the next turn of a conversation: the same history plus
    a new message) only prefills what is new. Free rows that ride along in a decode step write
    their junk entry after what they keep, so nothing kept is overwritten.
    """

    def __init__(self, model: LoadedModel, runner: GraphRunner) -> None:
        self.model, self.runner = model, runner
        self.slots: list[Request | None] = [None] * runner.slots
        self.kept: list[np.ndarray] = [np.zeros(0, np.int64)] * runner.slots
        self.kept_at = [0] * runner.slots  # when each slot was last released (for eviction)
        self._clock = 0
        self.order: deque[Request] = deque()  # admitted requests still prefilling, oldest first

    def free_slot(self) -> int | None:
        for i, r in enumerate(self.slots):
            if r is None:
                return i
        return None

    def take_slot(self, prompt: np.ndarray) -> tuple[int, int] | None:
        """(slot, reusable cached tokens) for a new prompt, or None when every slot is busy.

        Among the free slots, the one where taking it saves the most and destroys the least:
        prompt tokens found kept there (counted from MIN_REUSE tokens on) minus the kept tokens
        it would overwrite. So the next turn of a conversation lands on its own slot, a prompt
        that merely starts with the same system prompt does not evict another conversation while
        an empty slot exists, and otherwise the shortest, then the oldest, kept prefix goes.
        The prompt's last token is always fed again: its logits choose the first new token.
        """
        best, best_key, reuse = None, None, 0
        for i, r in enumerate(self.slots):
            if r is not None:
                continue
            shared = common_prefix(self.kept[i], prompt)
            shared = shared if shared >= MIN_REUSE else 0
            key = (2 * shared - len(self.kept[i]), -self.kept_at[i], -i)
            if best_key is None or key > best_key:
                best, best_key, reuse = i, key, min(shared, len(prompt) - 1)
        return None if best is None else (best, reuse)

    def keep(self, slot: int, tokens: np.ndarray) -> None:
        """Remember what a released slot's KV holds (at most max_context - 1 entries, so a
        ride-along write always lands after them)."""
        self._clock += 1
        self.kept[slot] = tokens[: self.runner.max_context - 1]
        self.kept_at[slot] = self._clock

    def forget(self) -> None:
        """After a failed run nothing in the buffers can be trusted."""
        self.kept = [np.zeros(0, np.int64)] * len(self.slots)

    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]


class Scheduler:
    """Owns the engine thread. `submit`, `cancel`, `add_worker`, `load` and `stop` are
    thread-safe."""

    def __init__(
        self,
        worker: Worker,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.max_queue, self.prefill_chunk, self.clock = max_queue, prefill_chunk, clock
        self.pending: deque[Request] = deque()
        self.workers: list[Worker] = [worker]
        self.current = worker
        self.cond = threading.Condition()
        self.outbox = Outbox()  # engine thread only: flushed once per step
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    # ---- called from other threads ------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.cond:
            if self._stopping:
                raise EngineClosedError("the engine is closed")
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(
                    f"the engine is busy: {len(self.pending)} requests are already waiting "
                    "(try again shortly)"
                )
            self.pending.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def add_worker(self, worker: Worker) -> Worker:
        """Make `worker` current; returns the previous one, which drains and is released."""
        with self.cond:
            old, self.current = self.current, worker
            self.workers.append(worker)
            self.cond.notify()
            return old

    def load(self) -> tuple[int, int]:
        """(queued, active): requests waiting for a slot and requests holding one.

        The lock keeps `pending` and `workers` still (admission moves a request from the queue to
        a slot under it, so none is counted twice or missed); slots are freed outside the lock,
        one atomic list store each, always before the stream hears that its request is done.
        """
        with self.cond:
            return len(self.pending), sum(len(w.active()) for w in self.workers)

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify()
        self.thread.join()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._stopping and not self._has_work():
                    self.cond.wait(timeout=self._next_deadline())
                    self._expire_pending(self.clock())
                    self.outbox.flush()
                if self._stopping:
                    break
                self._expire_pending(self.clock())
                self._admit()
                workers = list(self.workers)
            for worker in workers:
                try:
                    self._step(worker)
                except Exception as exc:  # a failed run ends its requests, not the engine
                    log.exception("engine step failed")
                    for r in worker.active():
                        self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")
                    worker.forget()
            self.outbox.flush()
            self._release_drained()
        for worker in self.workers:  # closing: end everything still running or queued
            for r in worker.active():
                self._finish(r, "cancelled")
        while self.pending:
            self._finish(self.pending.popleft(), "cancelled")
        self.outbox.flush()

    def _has_work(self) -> bool:
        if any(w.active() for w in self.workers) or len(self.workers) > 1:
            return True
        return any(r.cancelled for r in self.pending) or any(
            r.worker.free_slot() is not None for r in self.pending
        )

    def _next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.pending if r.deadline is not None]
        return max(0.0, min(deadlines) - self.clock()) if deadlines else None

    def _expire_pending(self, now: float) -> None:
        for r in [r for r in self.pending if r.cancelled or (r.deadline and now >= r.deadline)]:
            self.pending.remove(r)
            self._finish(r, "cancelled" if r.cancelled else "timeout")

    def _admit(self) -> None:
        """Move queued requests into free slots of their version, in order of arrival."""
        for r in list(self.pending):
            taken = r.worker.take_slot(r.prompt)
            if taken is None:
                continue
            self.pending.remove(r)
            r.slot, r.cached = taken
            r.reused, r.admitted = r.cached, self.clock()
            r.worker.slots[r.slot] = r
            r.worker.order.append(r)

    def _release_drained(self) -> None:
        if len(self.workers) == 1:  # no swap in progress (the common case: skip the lock)
            return
        with self.cond:
            for w in [w for w in self.workers if w is not self.current]:
                if not w.active() and not any(r.worker is w for r in self.pending):
                    self.workers.remove(w)
                    w.runner.release()
                    log.info("engine: released %s after the swap", w.model.ref)

    def _step(self, w: Worker) -> None:
        now = self.clock()
        for r in w.active():
            if r.cancelled:
                self._finish(r, "cancelled")
            elif r.deadline is not None and now >= r.deadline:
                self._finish(r, "timeout")
        self._prefill(w)
        decoding = [r for r in w.slots if r is not None and r.next_token is not None]
        if not decoding:
            return
        # one run for the rows from the lowest to the highest decoding slot; free rows and rows
        # still prefilling in between ride along and write one junk entry after what they hold
        first, last = decoding[0].slot, decoding[-1].slot
        ids, lengths = w.runner.ids, w.runner.seqlens
        lo, hi = w.runner.span(first, last - first + 1)  # with CUDA graphs: a bucket from row 0
        for i in range(lo, hi):
            r = w.slots[i]
            ids[i, 0] = 0
            lengths[i] = len(w.kept[i]) if r is None else r.cached
        for r in decoding:
            ids[r.slot, 0] = r.next_token
        logits = w.runner.decode(first, last - first + 1)
        tokens = choose_batch([r.sampler for r in decoding], logits, [r.slot for r in decoding])
        for r, token in zip(decoding, tokens, strict=True):
            r.cached += 1
            r.next_token = None
            self._emit(r, token)

    def _prefill(self, w: Worker) -> None:
        """Up to `prefill_chunk` prompt tokens, oldest admitted request first, one slot at a time
        (long prompts take several steps, so running streams keep going in between)."""
        budget = self.prefill_chunk
        while w.order and budget > 0:
            r = w.order[0]
            if r.done:
                w.order.popleft()
                continue
            take = min(budget, len(r.prompt) - r.cached)
            logits = w.runner.prefill(r.slot, r.prompt[r.cached : r.cached + take], r.cached)
            r.cached += take
            budget -= take
            if r.cached == len(r.prompt):
                w.order.popleft()
                self._emit(r, r.sampler.choose(logits))

    def _emit(self, r: Request, token: int) -> None:
        """Record a sampled token, stream its text, and end the request if it is done."""
        r.last = self.clock()
        if r.first is None:
            r.first = r.last
        r.tokens.append(token)
        if token in r.stop_ids and not r.params.ignore_eos:
            self._finish(r, "stop")
            return
        r.sampler.accept(token)
        self._send(r, r.stops.feed(r.detok.add(token)))
        if r.stops.stopped:
            self._finish(r, "stop")
        elif len(r.tokens) >= r.params.max_new_tokens:
            self._finish(r, "length")
        else:
            r.next_token = token

    def _send(self, r: Request, piece: str) -> None:
        if piece:
            r.text.append(piece)
            self.outbox.push(r.stream, piece)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """End a request: free its slot at once and hand the result to its stream."""
        if r.done:
            return
        r.done = True
        if reason in ("stop", "length") and not r.stops.stopped:  # a cut stop string ends it all
            self._send(r, r.stops.feed(r.detok.flush()))
            if not r.stops.stopped:
                self._send(r, r.stops.flush())
        if r.slot is not None and r.worker.slots[r.slot] is r:
            fed = np.concatenate([r.prompt, np.asarray(r.tokens, np.int64)])[: r.cached]
            r.worker.keep(r.slot, fed)
            r.worker.slots[r.slot] = None
        r.next_token = None
        now = self.clock()
        n = len(r.tokens)
        span = (r.last - r.first) if r.first is not None and r.last is not None else 0.0
        result = GenerationResult(
            token_ids=list(r.tokens),
            text="".join(r.text),
            finish_reason=reason,
            prompt_tokens=len(r.prompt),
            completion_tokens=n,
            queue_ms=((r.admitted or now) - r.submitted) * 1000,
            ttft_ms=((r.first - r.submitted) * 1000) if r.first is not None else 0.0,
            tokens_per_s=(n - 1) / span if n > 1 and span > 0 else 0.0,
            error=error,
            model=r.worker.model.ref,
            cached_tokens=r.reused,
        )
        self.outbox.finish(r.stream, result)
