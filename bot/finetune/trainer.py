"""`python -m bot trainer`: runs the fine-tuning jobs bots send through Redis (REDIS_URL), one at
a time, on this machine (its GPU when PyTorch sees one); needs the bots' DATABASE_URL and
MODEL_REGISTRY (shared storage), and DATA_DIR for the jobs' data and checkpoints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", default=None, help="consumer name (default: HOST-PID)")


async def _serve(consumer: str) -> None:
    from bot.backends.redis_backend import connect
    from bot.config import load_settings
    from bot.finetune.remote import Trainer
    from bot.storage.db import Database

    settings = load_settings()
    if not settings.redis_url:
        raise SystemExit("error: REDIS_URL is not set (the trainer serves jobs from Redis)")
    db = await Database.open(settings.database_url)
    client = connect(settings.redis_url)
    trainer = Trainer(
        client,
        db,
        data_dir=settings.data_dir,
        registry=settings.model_registry,
        prefix=settings.redis_prefix,
        consumer=consumer,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: (stop.set(), trainer.runner.cancel()))
    try:
        await trainer.run(stop)
    finally:
        await client.aclose()
        await db.close()


def main(args: argparse.Namespace) -> int:
    import os

    from bot.storage.db import DatabaseError

    try:
        asyncio.run(_serve(args.id or f"{socket.gethostname()}-{os.getpid()}"))
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
