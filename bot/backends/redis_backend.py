"""RedisBackend: generation by `python -m bot worker` processes, through Redis Streams.

A request goes onto PREFIX:requests (bot.backends.protocol), pinned to the version the prompt was
built for; a worker of the consumer group runs it and writes its pieces to PREFIX:reply:ID, which
RedisStream reads. Requires the `redis` extra (`pip install -e ".[redis]"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from bot.backends import protocol
from bot.backends.base import BackendStats, RestartPiece, WorkerInfo
from bot.backends.protocol import GROUP, GenerationRequest, Keys
from bot.engine import (
    EngineClosedError,
    EngineError,
    GenerationResult,
    LoadedModel,
    QueueFullError,
    SamplingParams,
    load_model,
)
from bot.engine.stream import PieceStream
from bot.engine.types import check_prompt
from bot.errors import quoted

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # one blocking read of a reply stream (below redis-py's socket timeout)
LATE_GRACE_S = 30.0  # past its timeout plus this, a request no worker finished ends as timeout
LOST_NOTE = "the Redis server lost this request (it restarted or was flushed); please try again"


CONNECT_TIMEOUT_S = 5.0


def connect(url: str) -> aioredis.Redis:
    """A client for URL (redis://host:port/db, rediss://, unix://) that decodes to str. Bytes
    that are not UTF-8 arrive as lone surrogates (surrogateescape), never as an exception that
    would end a loop; protocol.loads refuses them where a value is read."""
    return aioredis.from_url(
        url,
        decode_responses=True,
        encoding_errors="surrogateescape",
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )


async def ensure_group(client: aioredis.Redis, keys: Keys) -> None:
    """Create the requests stream and its consumer group unless they exist."""
    try:
        await client.xgroup_create(keys.requests, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read_pin(client: aioredis.Redis, keys: Keys) -> str | None:
    """The NAME@N new requests are pinned to; None if none is set, or if what is there is not
    NAME@N (logged, and deleted: a pin is never a path, and the next check sets a valid one)."""
    value = await client.get(keys.model)
    pinned = protocol.valid_ref(value)
    if value is not None and pinned is None:
        log.warning("ignoring the malformed version pin %s in %s", quoted(value), keys.model)
        await client.delete(keys.model)
    return pinned


def missing_group(exc: ResponseError) -> bool:
    text = str(exc)
    return "NOGROUP" in text or "no such key" in text


class RedisStream(PieceStream):
    """The pieces of one request, read from its reply stream (the ReplyStream interface)."""

    def __init__(
        self, backend: RedisBackend, request: GenerationRequest, deadline: float | None
    ) -> None:
        super().__init__()
        self._backend = backend
        self._client = backend.client
        self._keys = backend.keys
        self.request = request
        self._deadline = deadline  # time.monotonic() past which nobody is expected to answer
        self._text = ""  # text of the current attempt, so far
        self.restarts = 0
        self._reader = asyncio.create_task(self._read(), name=f"redis-reply-{request.id}")

    # -- reading the reply stream --
    async def _read(self) -> None:
        key, last, attempt = self._keys.reply(self.request.id), "0-0", 0
        try:
            while True:
                response = await self._client.xread({key: last}, count=256, block=READ_BLOCK_MS)
                if not response:
                    await self._idle_check()
                    if self.done:
                        return
                    continue
                for entry_id, fields in response[0][1]:
                    last = entry_id
                    data = protocol.decode_event(fields.get("d", ""))
                    if data["a"] < attempt:
                        continue  # a worker that lost the request (claimed by another)
                    if data["a"] > attempt:
                        if attempt and self._text:
                            self.restarts += 1
                            self._queue.put_nowait(RestartPiece(""))
                        attempt, self._text = data["a"], ""
                    if data["t"] == "p":
                        self._text += data["x"]
                        self._queue.put_nowait(data["x"])
                    elif data["t"] == "e":
                        self._finish(GenerationResult(**data["r"]))
                        await self._cleanup()
                        return
        except asyncio.CancelledError:
            raise
        except RedisError as exc:
            self._fail(f"lost the connection to Redis while streaming the reply ({exc})")
        except Exception as exc:  # a malformed event: end the reply instead of hanging
            log.exception("bad reply event for request %s", self.request.id)
            self._fail(f"bad reply from a worker ({exc})")

    async def _idle_check(self) -> None:
        """Nothing new for a while: a request Redis forgot, or one nobody answers in time."""
        if not await self._client.exists(self._keys.marker(self.request.id)):
            self._fail(LOST_NOTE)
        elif self._deadline is not None and time.monotonic() > self._deadline:
            self._finish(self._partial("timeout"))
            self._backend.send_cancel(self.request.id)

    async def _cleanup(self) -> None:
        with contextlib.suppress(RedisError):
            await self._client.delete(
                self._keys.reply(self.request.id), self._keys.marker(self.request.id)
            )

    def _partial(self, reason: str, error: str | None = None) -> GenerationResult:
        return GenerationResult(
            text=self._text,
            finish_reason=reason,
            prompt_tokens=len(self.request.prompt),
            error=error,
            model=self.request.model,
        )

    def _fail(self, error: str) -> None:
        log.warning("request %s failed: %s", self.request.id, error)
        self._finish(self._partial("error", error))

    def _finish(self, result: GenerationResult) -> None:
        if self.done:
            return
        super()._finish(result)
        self._backend.forget(self)

    def cancel(self) -> None:
        """Stop at once here (the result keeps the text so far); the worker is told to stop."""
        if self.done:
            return
        self._reader.cancel()
        self._finish(self._partial("cancelled"))
        self._backend.send_cancel(self.request.id)


class RedisBackend:
    """Generation by remote workers (GenerationBackend): prompts are built here with the pinned
    version's tokenizer, generated by whichever worker takes them."""

    def __init__(
        self,
        client: aioredis.Redis,
        model: LoadedModel,
        *,
        registry: str | Path | None = None,
        prefix: str = protocol.DEFAULT_PREFIX,
        max_queue: int = 64,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._model = model
        self._registry = registry
        self._max_queue = max_queue
        self._streams: set[RedisStream] = set()
        self._tasks: set[asyncio.Task] = set()
        self._model_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        ref: str | Path | None = None,
        *,
        registry: str | Path | None = None,
        prefix: str = protocol.DEFAULT_PREFIX,
        max_queue: int = 64,
    ) -> RedisBackend:
        """Connect and pin: the version already pinned in Redis (another shard chose it), else
        `ref` (None: the registry's active version), which then becomes the pin."""
        client = connect(url)
        keys = Keys(prefix)
        try:
            await ensure_group(client, keys)
            pinned = await read_pin(client, keys)
            model = await asyncio.to_thread(load_model, pinned or ref, registry)
            if pinned is None:
                await client.set(keys.model, model.ref, nx=True)
        except RedisError as exc:
            await client.aclose()
            raise EngineError(f"cannot reach Redis at {_safe_url(url)}: {exc}") from None
        except BaseException:
            await client.aclose()
            raise
        return cls(client, model, registry=registry, prefix=prefix, max_queue=max_queue)

    @property
    def model(self) -> LoadedModel:
        return self._model

    @property
    def closed(self) -> bool:
        return self._closed

    async def refresh(self) -> LoadedModel:
        """The version new requests are pinned to now, loaded here if another shard changed it
        (ChatService asks before it builds each prompt). EngineError if Redis cannot say."""
        try:
            pinned = await read_pin(self.client, self.keys)
            if pinned is None:  # a Redis that restarted empty: pin what this process runs
                await self.client.set(self.keys.model, self._model.ref, nx=True)
                pinned = await read_pin(self.client, self.keys)
        except RedisError as exc:
            raise EngineError(f"cannot reach Redis: {exc}") from None
        if pinned and pinned != self._model.ref:
            async with self._model_lock:
                if pinned != self._model.ref:
                    self._model = await asyncio.to_thread(load_model, pinned, self._registry)
                    log.info("following the pinned version %s", pinned)
        return self._model

    async def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> RedisStream:
        if self._closed:
            raise EngineClosedError("the bot is shutting down")
        params = params or SamplingParams()
        model = self._model
        prompt = [int(t) for t in prompt_ids]
        arch = getattr(model.manifest, "architecture", None)
        check_prompt(
            prompt,
            vocab=getattr(arch, "vocab_size", None),
            max_context=model.max_context,
            max_new_tokens=params.max_new_tokens,
        )
        request = GenerationRequest(
            id=uuid.uuid4().hex,
            prompt=prompt,
            params=params,
            model=model.ref,
            timeout_s=timeout_s,
            submitted=time.time(),
        )
        try:
            entry = await self._enqueue(request)
        except RedisError as exc:
            raise EngineError(f"cannot reach Redis: {exc}") from None
        if entry is None:
            raise QueueFullError(f"{self._max_queue} requests are already waiting for a worker")
        deadline = time.monotonic() + timeout_s + LATE_GRACE_S if timeout_s else None
        stream = RedisStream(self, request, deadline)
        self._streams.add(stream)
        return stream

    async def _enqueue(self, request: GenerationRequest) -> str | None:
        args = [
            self.keys.requests,
            self.keys.marker(request.id),
            GROUP,
            self._max_queue,
            request.encode(),
            request.key_ttl_s(),
        ]
        try:
            return await self.client.eval(protocol.ENQUEUE, 2, *args)
        except ResponseError as exc:
            if not missing_group(exc):
                raise
            await ensure_group(self.client, self.keys)  # Redis restarted empty
            return await self.client.eval(protocol.ENQUEUE, 2, *args)

    def send_cancel(self, request_id: str) -> None:
        """Raise request_id's cancel flag (in the background: cancel() is not async)."""

        async def flag() -> None:
            await self.client.set(self.keys.cancel(request_id), "1", ex=protocol.KEY_TTL_S)
            await self.client.delete(self.keys.marker(request_id))

        self._background(flag())

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except (RedisError, EngineError) as exc:
                log.warning("redis backend: %s", exc)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the background work (cancel flags) started so far."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def forget(self, stream: RedisStream) -> None:
        self._streams.discard(stream)

    async def swap(self, ref: str | Path) -> LoadedModel:
        """Pin new requests, from every shard, to `ref`; workers load it when they see it."""
        model = await asyncio.to_thread(load_model, ref, self._registry)
        async with self._model_lock:
            await self.client.set(self.keys.model, model.ref)
            self._model = model
        return model

    async def workers(self) -> list[WorkerInfo]:
        """The live workers, from their heartbeats (expired ones are dropped from the set)."""
        ids = sorted(await self.client.smembers(self.keys.workers))
        if not ids:
            return []
        beats = await self.client.mget([self.keys.worker(i) for i in ids])
        gone = [i for i, beat in zip(ids, beats, strict=True) if beat is None]
        if gone:
            await self.client.srem(self.keys.workers, *gone)
        now = time.time()
        infos = []
        for worker_id, beat in zip(ids, beats, strict=True):
            if beat is None:
                continue
            try:
                data = protocol.decode_beat(beat)
            except ValueError as exc:  # one bad worker does not hide the others
                log.warning("skipping the heartbeat of worker %s: %s", quoted(worker_id), exc)
                continue
            infos.append(
                WorkerInfo(
                    id=data["id"],
                    model=data["model"],
                    provider=data["provider"],
                    slots=data["slots"],
                    busy=data["busy"],
                    tokens_per_s=data["tokens_per_s"],
                    age_s=max(0.0, now - data["time"]),
                )
            )
        return infos

    async def waiting(self) -> int:
        """Requests no worker has taken yet."""
        try:
            length = await self.client.xlen(self.keys.requests)
            pending = await self.client.xpending(self.keys.requests, GROUP)
        except ResponseError as exc:
            if missing_group(exc):
                return 0
            raise
        return max(0, length - int(pending["pending"]))

    async def stats(self) -> BackendStats:
        workers = await self.workers()
        providers = sorted({w.provider for w in workers})
        return BackendStats(
            queued=await self.waiting(),
            active=sum(w.busy for w in workers),
            slots=sum(w.slots for w in workers),
            model=(await self.refresh()).ref,
            provider="+".join(providers) if providers else "no workers",
            workers=tuple(workers),
        )

    async def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.cancel()
        await self.settle()
        await self.client.aclose()


def _safe_url(url: str) -> str:
    """The URL without its password (secrets are never logged)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)
