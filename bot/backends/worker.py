"""InferenceWorker: one Engine serving generation requests from Redis Streams (`bot worker`).

It reads requests from
PREFIX:requests in the consumer group "workers" as it has free KV slots, streams each reply's
pieces to PREFIX:reply:ID and acks the request when the reply has ended. Requests that another
worker took and left idle past WORKER_CLAIM_IDLE_S (a worker killed mid-reply) are claimed with
XAUTOCLAIM and generated again from the start. A request pinned to a version this worker does
not run makes it load that version (the engine's hot swap: replies in flight finish on the old
one). See bot/backends/protocol.py for the keys and messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from bot.backends import protocol
from bot.backends.protocol import GROUP, GenerationRequest, Keys
from bot.backends.redis_backend import ensure_group, missing_group
from bot.engine import Engine, EngineError, GenerationResult, Stream

log = logging.getLogger(__name__)

SPEED_WINDOW_S = 30.0  # tokens/s in heartbeats: completion tokens over this recent past


class WorkerError(Exception):
    """A worker that cannot go on (one line; `python -m bot worker` exits non-zero with it)."""


def _one_line(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "it ended"
    return " ".join(text.split())[:300]


def redis_location(client: aioredis.Redis) -> str:
    """Where `client` connects (host:port/db or the socket path), never its password."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@dataclass
class Job:
    """One request this worker has taken."""

    entry_id: str
    request: GenerationRequest | None = None
    attempt: int = 0
    stream: Stream | None = None
    lost: bool = False  # another worker claimed it, or Redis forgot it: write nothing more
    cancelled: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)

    def stop(self, *, lost: bool) -> None:
        self.lost = self.lost or lost
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


class InferenceWorker:
    """Serves the requests stream with one Engine until `stop` is set."""

    def __init__(
        self,
        client: aioredis.Redis,
        engine: Engine,
        *,
        worker_id: str,
        prefix: str = protocol.DEFAULT_PREFIX,
        claim_idle_s: float = 15.0,
        heartbeat_s: float = 1.0,
        cancel_poll_s: float = 0.2,
        shutdown_grace_s: float = 10.0,
    ) -> None:
        if claim_idle_s <= heartbeat_s:
            raise ValueError("the claim idle time must be longer than the heartbeat interval")
        self.client = client
        self.engine = engine
        self.id = worker_id
        self.keys = Keys(prefix)
        self.claim_idle_s = claim_idle_s
        self.heartbeat_s = heartbeat_s
        self.cancel_poll_s = cancel_poll_s
        self.shutdown_grace_s = shutdown_grace_s
        self.jobs: dict[str, Job] = {}
        self.slots = engine.stats().slots
        self._freed = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._finished: deque[tuple[float, int]] = deque()
        self._started_at = time.monotonic()
        self.where = redis_location(client)

    # -- the loops --
    async def run(self, stop: asyncio.Event) -> None:
        """Take requests until `stop` is set, then let the running ones finish (up to the
        grace time; the rest stay unacked, so another worker claims them). WorkerError when a
        loop fails in a way it cannot go on from (after the same orderly stop)."""
        if not await self._retrying(lambda: ensure_group(self.client, self.keys), stop):
            log.warning("worker %s: stopped before Redis at %s answered", self.id, self.where)
            return
        loops = [
            asyncio.create_task(self._read_loop(stop), name="read"),
            asyncio.create_task(self._maintain_loop(stop), name="maintenance"),
            asyncio.create_task(self._cancel_loop(stop), name="cancel"),
        ]
        stopped = asyncio.create_task(stop.wait())
        log.info("worker %s serving %s with %d slots", self.id, self.engine.model.ref, self.slots)
        failure: WorkerError | None = None
        try:
            await asyncio.wait([stopped, *loops], return_when=asyncio.FIRST_COMPLETED)
            for task in loops:
                if task.done() and not stop.is_set():  # a loop never ends on its own
                    exc = None if task.cancelled() else task.exception()
                    failure = WorkerError(f"the {task.get_name()} loop failed: {_one_line(exc)}")
                    log.error("worker %s: %s; stopping", self.id, failure, exc_info=exc)
                    break
            stop.set()
            if self.jobs:
                log.info("worker %s: waiting for %d reply(ies)", self.id, len(self.jobs))
                tasks = [j.task for j in self.jobs.values() if j.task is not None]
                await asyncio.wait(tasks, timeout=self.shutdown_grace_s)
            for job in list(self.jobs.values()):
                job.stop(lost=True)  # unacked: another worker generates it again
        finally:
            for task in [*loops, stopped]:
                task.cancel()
            await asyncio.gather(*loops, stopped, return_exceptions=True)
            jobs = [j.task for j in self.jobs.values() if j.task is not None]
            await asyncio.gather(*jobs, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.client.delete(self.keys.worker(self.id))
                await self.client.srem(self.keys.workers, self.id)
        if failure is not None:
            raise failure

    async def _retrying(self, call, stop: asyncio.Event) -> bool:
        """`call()` until it reaches Redis (True) or `stop` is set (False, at once: a signal
        never waits for a connection attempt or a back-off)."""
        delay = 0.2
        while not stop.is_set():
            attempt = asyncio.create_task(call())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([attempt, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not attempt.done():
                    attempt.cancel()
                    await asyncio.gather(attempt, return_exceptions=True)
            if attempt.cancelled():
                return False
            exc = attempt.exception()
            if exc is None:
                return True
            if not isinstance(exc, RedisError):
                raise exc
            log.warning(
                "worker %s: cannot reach Redis at %s (%s); retrying", self.id, self.where, exc
            )
            await self._pause(stop, delay)
            delay = min(delay * 2, 5.0)
        return False

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        """Wait `seconds`, or less if `stop` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    def free_slots(self) -> int:
        return self.slots - len(self.jobs)

    async def _read_loop(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            free = self.free_slots()
            if free <= 0:
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), 1.0)
                continue
            try:
                response = await self.client.xreadgroup(
                    GROUP, self.id, {self.keys.requests: ">"}, count=free, block=1000
                )
                delay = 0.2
            except ResponseError as exc:
                if not missing_group(exc):
                    raise
                await self._retrying(lambda: ensure_group(self.client, self.keys), stop)
                continue
            except RedisError as exc:
                log.warning("worker %s: cannot read requests (%s)", self.id, exc)
                await self._pause(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            for _, entries in response or []:
                for entry_id, fields in entries:
                    self._take(entry_id, fields)

    async def _maintain_loop(self, stop: asyncio.Event) -> None:
        """Heartbeat, keep our requests from looking idle, claim the idle ones of dead workers."""
        while not stop.is_set():
            try:
                await self._heartbeat()
                await self._refresh()
                await self._claim()
            except RedisError as exc:
                log.warning("worker %s: Redis unavailable (%s)", self.id, exc)
            await self._pause(stop, self.heartbeat_s)

    async def _cancel_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.cancel_poll_s)
            jobs = [j for j in self.jobs.values() if j.request is not None and not j.cancelled]
            if not jobs:
                continue
            try:
                flags = await self.client.mget([self.keys.cancel(j.request.id) for j in jobs])
            except RedisError:
                continue
            for job, flag in zip(jobs, flags, strict=True):
                if flag is not None:
                    log.info("worker %s: request %s cancelled", self.id, job.request.id)
                    job.stop(lost=False)

    async def _heartbeat(self) -> None:
        stats = self.engine.stats()
        beat = {
            "id": self.id,
            "model": stats.model,
            "provider": stats.provider,
            "slots": self.slots,
            "busy": len(self.jobs),
            "tokens_per_s": round(self.tokens_per_s(), 2),
            "time": time.time(),
        }
        ttl = max(3, int(self.heartbeat_s * 3 + 1))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(self.id), json.dumps(beat), ex=ttl)
            pipe.sadd(self.keys.workers, self.id)
            await pipe.execute()

    async def _refresh(self) -> None:
        ids = list(self.jobs)
        if not ids:
            return
        lost = await self.client.eval(protocol.REFRESH, 1, self.keys.requests, GROUP, self.id, *ids)
        for entry_id in lost or []:
            job = self.jobs.get(entry_id)
            if job is not None and not job.lost:
                log.warning("worker %s: lost request entry %s", self.id, entry_id)
                job.stop(lost=True)

    async def _claim(self) -> None:
        free = self.free_slots()
        if free <= 0:
            return
        try:
            claimed = await self.client.xautoclaim(
                self.keys.requests,
                GROUP,
                self.id,
                min_idle_time=int(self.claim_idle_s * 1000),
                start_id="0-0",
                count=free,
            )
        except ResponseError as exc:
            if missing_group(exc):
                return
            raise
        for entry_id, fields in claimed[1]:
            if entry_id in self.jobs:
                continue
            if not fields:  # deleted while pending
                await self.client.xack(self.keys.requests, GROUP, entry_id)
                continue
            log.info("worker %s: claimed idle request entry %s", self.id, entry_id)
            self._take(entry_id, fields)

    # -- one request --
    def _take(self, entry_id: str, fields: dict) -> None:
        job = Job(entry_id)
        self.jobs[entry_id] = job
        job.task = asyncio.create_task(self._serve(job, fields), name=f"job-{entry_id}")

    async def _serve(self, job: Job, fields: dict) -> None:
        try:
            await self._generate(job, fields)
        except RedisError as exc:
            log.warning("worker %s: Redis failed during %s (%s)", self.id, job.entry_id, exc)
            job.stop(lost=True)
        except Exception as exc:  # answered and acked: a request that fails is never retried
            log.exception("worker %s: request entry %s failed", self.id, job.entry_id)
            job.stop(lost=False)
            with contextlib.suppress(RedisError):
                error = f"the worker failed on this request ({_one_line(exc)})"
                await self._refuse(job, fields, error)
        finally:
            if job.stream is not None and not job.stream.done:
                job.stream.cancel()
            self.jobs.pop(job.entry_id, None)
            self._freed.set()

    async def _generate(self, job: Job, fields: dict) -> None:
        try:
            request = GenerationRequest.decode(fields.get("d", ""))
        except ValueError as exc:
            log.warning("worker %s: refusing entry %s: %s", self.id, job.entry_id, exc)
            await self._refuse(job, fields, f"bad request: {exc}")
            return
        job.request = request
        keys, ttl = self.keys, request.key_ttl_s()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(keys.attempt(request.id))
            pipe.expire(keys.attempt(request.id), ttl)
            pipe.exists(keys.cancel(request.id))
            pipe.exists(keys.marker(request.id))
            job.attempt, _, cancelled, waited_for = await pipe.execute()
        if cancelled or not waited_for:  # nobody waits for it any more
            await self._finish(job, self._empty(request, "cancelled"))
            return
        await self._write(job, protocol.event("s", job.attempt, w=self.id), expire=ttl)
        remaining = request.remaining_s()
        if remaining is not None and remaining <= 0:
            await self._finish(job, self._empty(request, "timeout"))
            return
        try:
            engine = await self._engine_for(request.model)
            job.stream = engine.submit(request.prompt, request.params, timeout_s=remaining)
        except (EngineError, ValueError) as exc:
            log.warning("worker %s: cannot run request %s: %s", self.id, request.id, exc)
            await self._finish(job, self._empty(request, "error", str(exc)))
            return
        if job.cancelled:
            job.stream.cancel()
        await self._relay(job)
        if not job.lost:
            result = await job.stream.wait()
            self._finished.append((time.monotonic(), result.completion_tokens))
            await self._finish(job, result)

    async def _refuse(self, job: Job, fields: dict, error: str) -> None:
        """Ack and delete a request this worker cannot serve, and end its reply stream with an
        error when the entry names a request id (so whoever waits for it is told at once)."""
        request_id = protocol.request_id_of(fields.get("d", ""))
        if request_id is None:
            await self.client.xack(self.keys.requests, GROUP, job.entry_id)
            await self.client.xdel(self.keys.requests, job.entry_id)
            return
        keys = self.keys
        attempt = await self.client.incr(keys.attempt(request_id))
        result = GenerationResult(finish_reason="error", error=error)
        await self.client.eval(
            protocol.FINISH,
            4,
            keys.requests,
            keys.attempt(request_id),
            keys.reply(request_id),
            keys.marker(request_id),
            GROUP,
            job.entry_id,
            attempt,
            protocol.event("e", attempt, r=protocol.result_to_dict(result)),
            protocol.KEY_TTL_S,
        )

    async def _relay(self, job: Job) -> None:
        """Write the engine's pieces to the reply stream; pieces that arrive while a write is
        under way go out together in the next one (one Redis round trip, not one per token)."""
        assert job.stream is not None
        pending: list[str] = []
        arrived = asyncio.Event()
        ended = False

        async def pull() -> None:
            nonlocal ended
            try:
                async for piece in job.stream:
                    pending.append(piece)
                    arrived.set()
            finally:
                ended = True
                arrived.set()

        puller = asyncio.create_task(pull())
        try:
            while not (ended and not pending):
                await arrived.wait()
                arrived.clear()
                if pending and not job.lost:
                    text = "".join(pending)
                    pending.clear()
                    await self._write(job, protocol.event("p", job.attempt, x=text))
                elif job.lost:
                    return
        finally:
            puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await puller

    async def _engine_for(self, ref: str) -> Engine:
        """The engine, running `ref` for new requests (loaded here if it is another version)."""
        if self.engine.model.ref != ref:
            async with self._swap_lock:
                if self.engine.model.ref != ref:
                    log.info("worker %s: loading %s (requested)", self.id, ref)
                    await self.engine.swap(ref)
        return self.engine

    async def _write(self, job: Job, data: str, expire: int | None = None) -> None:
        assert job.request is not None
        key = self.keys.reply(job.request.id)
        if expire is None:
            await self.client.xadd(key, {"d": data})
            return
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"d": data})
            pipe.expire(key, expire)
            await pipe.execute()

    async def _finish(self, job: Job, result: GenerationResult) -> None:
        assert job.request is not None
        request, keys = job.request, self.keys
        done = protocol.event("e", job.attempt, r=protocol.result_to_dict(result))
        ok = await self.client.eval(
            protocol.FINISH,
            4,
            keys.requests,
            keys.attempt(request.id),
            keys.reply(request.id),
            keys.marker(request.id),
            GROUP,
            job.entry_id,
            job.attempt,
            done,
            request.key_ttl_s(),
        )
        if not ok:
            log.info("worker %s: request %s was taken over; result dropped", self.id, request.id)

    @staticmethod
    def _empty(request: GenerationRequest, reason: str, error: str | None = None):
        return GenerationResult(
            finish_reason=reason,
            prompt_tokens=len(request.prompt),
            error=error,
            model=request.model,
        )

    def tokens_per_s(self) -> float:
        """Completion tokens per second over the recent past."""
        now = time.monotonic()
        while self._finished and now - self._finished[0][0] > SPEED_WINDOW_S:
            self._finished.popleft()
        span = min(SPEED_WINDOW_S, max(now - self._started_at, 1e-3))
        return sum(tokens for _, tokens in self._finished) / span
