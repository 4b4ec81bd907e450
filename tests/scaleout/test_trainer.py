"""The Redis layout of fine-tuning: a job goes to the trainer through its stream, its updates
come back through the events stream, Cancel goes through Redis too; malformed entries are
skipped (a real Redis; the job's child processes are real, on the tiny model)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from bot.finetune import jobs
from bot.finetune.remote import FinetuneKeys, Trainer, parse_event, request_cancel, submit
from bot.finetune.start import new_job
from bot.storage.db import Database
from bot.storage.models import Channel, JobStatus, Message, Role
from tests.scaleout.conftest import needs_redis

pytestmark = needs_redis
GUILD = 77


async def store(db: Database, n: int = 6) -> None:
    async with db.session() as s, s.begin():
        for c in range(n):
            s.add(Channel(id=500 + c, guild_id=GUILD))
            s.add(Message(channel_id=500 + c, author_id=9, author_name="u", role=Role.USER,
                          content=f"question {c}"))  # fmt: skip
            s.add(Message(channel_id=500 + c, role=Role.ASSISTANT, content=f"answer {c}"))


async def updates(client, keys: FinetuneKeys, db: Database, job_id: int, last: str = "0"):
    """The job's row after each update the trainer announces (blocking reads, no sleeps)."""
    quiet = 0
    while True:
        reply = await client.xread({keys.events: last}, block=2000)  # under the socket timeout
        quiet = 0 if reply else quiet + 1
        assert quiet < 150, "no update from the trainer in 300 s"
        for _, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                if parse_event(fields) == job_id:
                    yield await jobs.get(db, job_id)


async def test_a_job_through_redis_reports_progress_and_cancels(
    redis_client, prefix, tiny_registry, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(tiny_registry.root, registry)
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await store(db)
    keys = FinetuneKeys(prefix)
    job, plan = await new_job(db, registry=registry, data_dir=tmp_path, base_ref="tiny@1",
                              guild_id=GUILD, channel_id=None, user_id=1,
                              steps=10_000)  # fmt: skip
    await redis_client.xadd(keys.jobs, {"d": "not json"})  # skipped with a warning
    await submit(redis_client, keys, job.id, plan.base_ref, plan.method)
    trainer = Trainer(redis_client, db, data_dir=tmp_path, registry=registry, prefix=prefix,
                      consumer="t1", cancel_poll_s=0.05)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        phases = []
        async for row in updates(redis_client, keys, db, job.id):
            phases.append(row.phase)
            if row.phase == "training" and row.step >= 1:
                assert row.total == 10_000 and row.loss is not None
                await request_cancel(redis_client, keys, job.id)
            if row.status in jobs.ENDED:
                break
        assert row.status == JobStatus.CANCELLED, (row.status, row.error)
        assert phases[0] == "data" and "training" in phases
        assert await redis_client.xlen(keys.jobs) == 0  # both entries acknowledged and deleted
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await db.close()
