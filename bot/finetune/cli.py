"""`python -m bot finetune --guild ID`: the operator's way to run a fine-tuning job (the same job
/model finetune runs), printing its progress; the new version is published, not activated."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import NoReturn

from bot.config import load_settings
from bot.finetune import jobs
from bot.finetune.errors import FinetuneError
from bot.finetune.progress import PHASES, training_line
from bot.finetune.runner import JobRunner
from bot.finetune.start import DEFAULT_STEPS, MAX_STEPS, new_job
from bot.storage.db import Database, DatabaseError
from bot.storage.models import FinetuneJob, JobStatus
from export.registry import Registry, RegistryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guild", type=int, required=True, help="the server (guild) id")
    parser.add_argument(
        "--channels", type=int, nargs="*", default=[], help="only these channels (ids)"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--method", choices=("auto", "lora", "full"), default="auto")
    parser.add_argument(
        "--model", default=None, help="the version to tune, NAME or NAME@N (default: the active)"
    )
    parser.add_argument("--database-url", default=None, help="default: DATABASE_URL / settings")


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    registry = Registry(settings.model_registry)
    base = args.model or (registry.active() or _no_active()).ref
    db = await Database.open(args.database_url or settings.database_url)
    try:
        await jobs.fail_orphans(db)
        job, plan = await new_job(
            db,
            registry=registry.root,
            data_dir=settings.data_dir,
            base_ref=base,
            guild_id=args.guild,
            channel_id=None,
            user_id=0,
            steps=args.steps,
            channels=args.channels,
            method=None if args.method == "auto" else args.method,
        )
        print(f"job {job.id}: {plan.describe()}, {args.steps} steps", flush=True)
        shown: list[str] = []

        async def show(j: FinetuneJob) -> None:
            line = training_line(j) if j.phase == "training" else PHASES.get(j.phase, j.phase)
            if not shown or shown[-1] != line:
                shown.append(line)
                print(f"  {line}", flush=True)

        runner = JobRunner(db, settings.data_dir, registry.root, on_update=show)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, runner.cancel)
        done = await runner.run(job, plan)
    finally:
        await db.close()
    f = done.figures or {}
    if done.status != JobStatus.FINISHED:
        print(f"error: job {done.id} {done.status}: {done.error or 'cancelled'}", file=sys.stderr)
        return 1
    print(
        f"published {done.result_ref}: held-out perplexity {f['perplexity_before']:.3f} -> "
        f"{f['perplexity_after']:.3f} (python -m export use {done.result_ref} to serve it)"
    )
    return 0


def _no_active() -> NoReturn:
    raise FinetuneError("the registry has no active version; give --model NAME@N")


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.steps <= MAX_STEPS:
        print(f"error: --steps must be between 1 and {MAX_STEPS}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (FinetuneError, RegistryError, DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
