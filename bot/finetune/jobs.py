"""The jobs table's queries: create (one job at a time), read, update, and what a restart finds."""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from bot.finetune.errors import FinetuneError
from bot.storage.models import FinetuneJob, JobStatus

if TYPE_CHECKING:
    from bot.storage.db import Database

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)
RESTART_NOTE = "the bot stopped while this job ran (restart or crash); start it again"


async def create(
    db: Database,
    *,
    guild_id: int,
    channel_id: int | None,
    started_by: int,
    options: dict[str, Any],
) -> FinetuneJob:
    """A queued job; FinetuneError while another job is queued or running (one at a time)."""
    async with db.session() as s, s.begin():
        busy = await s.scalar(select(FinetuneJob).where(FinetuneJob.status.in_(ACTIVE)))
        if busy is not None:
            raise FinetuneError(
                f"job {busy.id} is {busy.status}; one fine-tuning job runs at a time"
            )
        job = FinetuneJob(
            guild_id=guild_id,
            channel_id=channel_id,
            started_by=started_by,
            options={**options, "owner": os.getpid()},
            status=JobStatus.QUEUED,
            figures={},
        )
        s.add(job)
    return job


async def get(db: Database, job_id: int) -> FinetuneJob | None:
    async with db.session() as s:
        return await s.get(FinetuneJob, job_id)


async def recent(db: Database, guild_id: int | None = None, limit: int = 10) -> list[FinetuneJob]:
    """The newest jobs first (of one server when given)."""
    query = select(FinetuneJob).order_by(FinetuneJob.id.desc()).limit(limit)
    if guild_id is not None:
        query = query.where(FinetuneJob.guild_id == guild_id)
    async with db.session() as s:
        return list((await s.scalars(query)).all())


async def update(db: Database, job_id: int, **fields: Any) -> FinetuneJob:
    """Set columns of a job (`figures` is merged into the stored figures); the row after."""
    async with db.session() as s, s.begin():
        job = await s.get(FinetuneJob, job_id)
        if job is None:
            raise FinetuneError(f"no job {job_id}")
        if "figures" in fields:
            fields["figures"] = {**(job.figures or {}), **fields["figures"]}
        if fields.get("status") in ENDED and job.finished_at is None:
            fields.setdefault("finished_at", datetime.now(UTC))
        if fields.get("status") == JobStatus.RUNNING and job.started_at is None:
            fields.setdefault("started_at", datetime.now(UTC))
        for name, value in fields.items():
            setattr(job, name, value)
    return job


def _alive(pid: object, *words: str) -> bool:
    """Whether process `pid` runs on this machine with every word in its command line."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return all(w in cmdline for w in words)


def _live_owner(pid: object) -> bool:
    """Another live runner process (this process's own jobs are orphans at a bot's start)."""
    return pid != os.getpid() and _alive(pid, "bot")


def _stop(pid: int | None) -> None:
    """Stop the step a dead runner left behind (its own process group), if it still runs."""
    if pid is not None and _alive(pid, "-m") and (_alive(pid, "models") or _alive(pid, "export")):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)


async def fail_orphans(
    db: Database, note: str = RESTART_NOTE, statuses: tuple[JobStatus, ...] = ACTIVE
) -> list[FinetuneJob]:
    """Jobs whose runner process is gone (a restart, a crash) become failed with `note`, and any
    step they left running is stopped; returns them. Jobs of a live runner (another process on
    this machine, e.g. `python -m bot finetune`) are left alone."""
    async with db.session() as s, s.begin():
        rows = list(await s.scalars(select(FinetuneJob).where(FinetuneJob.status.in_(statuses))))
        rows = [j for j in rows if not _live_owner((j.options or {}).get("owner"))]
        now = datetime.now(UTC)
        for job in rows:
            _stop(job.pid)
            job.status, job.error, job.finished_at = JobStatus.FAILED, note, now
            job.phase = "failed"
    return rows
