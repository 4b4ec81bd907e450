"""The Redis layout: jobs go to `python -m bot trainer` through a stream of their own, updates
come back through another (the job's state itself is in the shared database).

Keys (PREFIX as REDIS_PREFIX):
  PREFIX:finetune:jobs      Stream of {"d": {"job": ID, "base": NAME@N, "method": ...}};
                            consumer group "trainers"; acked and deleted once the job ended
  PREFIX:finetune:events    Stream of {"job": ID}: the job's row changed (bots edit its message)
  PREFIX:finetune:cancel:ID set by a bot's Cancel button; the trainer polls it
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from bot.finetune import jobs
from bot.finetune.errors import FinetuneError
from bot.finetune.plan import plan_for
from bot.finetune.runner import JobRunner
from bot.storage.models import FinetuneJob, JobStatus
from export.registry import Registry, RegistryError

log = logging.getLogger(__name__)
GROUP = "trainers"
EVENTS_MAXLEN = 1000
CANCEL_TTL_S = 86400


class FinetuneKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:finetune:jobs"
        self.events = f"{prefix}:finetune:events"

    def cancel(self, job_id: int) -> str:
        return f"{self.prefix}:finetune:cancel:{job_id}"


async def submit(client: Any, keys: FinetuneKeys, job_id: int, base: str, method: str) -> None:
    data = json.dumps({"job": job_id, "base": base, "method": method})
    await client.xadd(keys.jobs, {"d": data})


async def request_cancel(client: Any, keys: FinetuneKeys, job_id: int) -> None:
    await client.set(keys.cancel(job_id), "1", ex=CANCEL_TTL_S)


async def announce(client: Any, keys: FinetuneKeys, job_id: int) -> None:
    await client.xadd(keys.events, {"job": str(job_id)}, maxlen=EVENTS_MAXLEN, approximate=True)


def parse_job(fields: dict[str, str]) -> tuple[int, str, str]:
    """(job id, base ref, method) of a stream entry, validated like user input."""
    try:
        data = json.loads(fields["d"])
        job_id, base, method = data["job"], data["base"], data["method"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed fine-tuning job entry: {exc}") from None
    if not isinstance(job_id, int) or job_id < 1 or not isinstance(base, str):
        raise ValueError("malformed fine-tuning job entry: job or base")
    if method not in ("lora", "full"):
        raise ValueError(f"malformed fine-tuning job entry: method {method!r}")
    return job_id, base, method


def parse_event(fields: dict[str, str]) -> int | None:
    value = fields.get("job", "")
    return int(value) if value.isdigit() else None


async def ensure_group(client: Any, keys: FinetuneKeys) -> None:
    try:
        await client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Trainer:
    """Takes jobs from the stream one at a time and runs them with a JobRunner (child
    processes), announcing every change of the job's row on the events stream."""

    def __init__(
        self,
        client: Any,
        db: Any,
        *,
        data_dir: Path,
        registry: Path,
        prefix: str,
        consumer: str,
        cancel_poll_s: float = 0.5,
    ) -> None:
        self.client, self.db, self.keys = client, db, FinetuneKeys(prefix)
        self.data_dir, self.registry, self.consumer = Path(data_dir), Path(registry), consumer
        self.cancel_poll_s = cancel_poll_s
        self.runner = JobRunner(db, self.data_dir, self.registry, on_update=self._changed)

    async def _changed(self, job: FinetuneJob) -> None:
        await announce(self.client, self.keys, job.id)

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_group(self.client, self.keys)
        # a running job of a dead trainer ends failed; queued ones wait in the stream
        for job in await jobs.fail_orphans(self.db, statuses=(JobStatus.RUNNING,)):
            await self._changed(job)
        pending = "0"  # first this consumer's own unacknowledged entries, then new ones
        while not stop.is_set():
            reply = await self.client.xreadgroup(
                GROUP, self.consumer, {self.keys.jobs: pending}, count=1, block=500
            )
            entries = reply[0][1] if reply else []
            if not entries:
                pending = ">"
                continue
            for entry_id, fields in entries:
                await self._one(fields)
                await self.client.xack(self.keys.jobs, GROUP, entry_id)
                await self.client.xdel(self.keys.jobs, entry_id)

    async def _one(self, fields: dict[str, str]) -> None:
        try:
            job_id, base, method = parse_job(fields)
        except ValueError as exc:
            log.warning("%s", exc)
            return
        job = await jobs.get(self.db, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return
        options = {**(job.options or {}), "owner": os.getpid()}
        job = await jobs.update(self.db, job_id, options=options)
        try:
            info = await asyncio.to_thread(Registry(self.registry).resolve_name, base)
            plan = await asyncio.to_thread(plan_for, info, method)
        except (FinetuneError, RegistryError) as exc:
            job = await jobs.update(self.db, job_id, status=JobStatus.FAILED, error=str(exc))
            await self._changed(job)
            return
        watch = asyncio.create_task(self._watch_cancel(job_id))
        try:
            await self.runner.run(job, plan)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_cancel(self, job_id: int) -> None:
        key = self.keys.cancel(job_id)
        while not await self.client.exists(key):
            await asyncio.sleep(self.cancel_poll_s)
        self.runner.cancel()
