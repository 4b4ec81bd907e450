"""Starting a job (the cog and the CLI share it): refusals first, then a queued row."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from bot.finetune import jobs
from bot.finetune.data import check_amount, collect
from bot.finetune.plan import Plan, check_room, plan_for
from export.registry import Registry

if TYPE_CHECKING:
    from bot.storage.db import Database
    from bot.storage.models import FinetuneJob

MAX_STEPS = 10_000
DEFAULT_STEPS = 200


async def new_job(
    db: Database,
    *,
    registry: Path,
    data_dir: Path,
    base_ref: str,
    guild_id: int,
    channel_id: int | None,
    user_id: int,
    steps: int = DEFAULT_STEPS,
    channels: Collection[int] = (),
    method: str | None = None,
) -> tuple[FinetuneJob, Plan]:
    """A queued job to tune `base_ref` on the server's dialogues; FinetuneError (one line) when
    the base's checkpoint is gone, the data too small, the disk or memory short, or a job runs."""
    info = await asyncio.to_thread(Registry(registry).resolve_name, base_ref)
    plan = await asyncio.to_thread(plan_for, info, method)
    await asyncio.to_thread(check_room, plan, data_dir)
    _, summary = await collect(db, guild_id, channels)
    check_amount(summary["conversations"])
    options = {"steps": steps, "channels": sorted(channels), "method": plan.method}
    job = await jobs.create(
        db, guild_id=guild_id, channel_id=channel_id, started_by=user_id, options=options
    )
    return job, plan
