"""`python -m bot worker`: an inference worker; serves generation requests from Redis (REDIS_URL).

It loads the version pinned in Redis (else MODEL or the registry's active version; MODEL_REGISTRY,
DEVICE and ENGINE_* as for the bot), then runs bot.backends.worker.InferenceWorker until SIGTERM
or SIGINT: replies in flight get SHUTDOWN_GRACE_S to finish, the rest are left to other workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import BotConfig


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configuration comes from the environment, .env or BOT_CONFIG (REDIS_URL is required)."""
    from bot.logs import add_log_level_argument

    parser.add_argument("--id", help="worker id (default: WORKER_ID, else HOST-PID)")
    add_log_level_argument(parser)


async def serve(settings: BotConfig, worker_id: str, worker_cls: type | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (`worker_cls`: an InferenceWorker subclass, for tests).
    A signal is heeded from the start: while Redis cannot be reached too. WorkerError when it
    cannot go on."""
    from redis.exceptions import RedisError

    from bot.backends.protocol import Keys
    from bot.backends.redis_backend import connect, read_pin
    from bot.backends.worker import InferenceWorker
    from bot.engine import Engine
    from bot.engine.loader import resolve_version

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    ref = resolve_version(settings.model, settings.model_registry)  # ModelLoadError: one line
    client = connect(settings.redis_url)
    engine = None
    try:
        pinned = None
        with contextlib.suppress(RedisError, TimeoutError):
            pinned = await asyncio.wait_for(read_pin(client, Keys(settings.redis_prefix)), 10)
        options = settings.engine_options()
        options["max_queue"] = max(options["max_queue"], options["slots"])
        engine = await Engine.start(pinned or ref, **options)
        worker = (worker_cls or InferenceWorker)(
            client,
            engine,
            worker_id=worker_id,
            prefix=settings.redis_prefix,
            claim_idle_s=settings.worker_claim_idle_s,
            heartbeat_s=settings.worker_heartbeat_s,
            shutdown_grace_s=settings.shutdown_grace_s,
        )
        await worker.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
        if engine is not None:
            await engine.close()
        await client.aclose()


def main(args: argparse.Namespace) -> int:
    from bot.backends.protocol import WORKER_ID_RE
    from bot.backends.worker import WorkerError
    from bot.config import ConfigError, get_settings
    from bot.engine import EngineError
    from bot.errors import quoted
    from bot.logs import configure_logging

    worker_id = "?"
    try:
        settings = get_settings()
        level = getattr(args, "log_level", None) or settings.log_level
        configure_logging(level, settings.log_format, secrets=settings.secrets())
        if not settings.redis_url:
            raise ConfigError("REDIS_URL is not set; a worker serves requests from Redis")
        worker_id = args.id or settings.worker_id or default_worker_id()
        if not WORKER_ID_RE.fullmatch(worker_id):
            raise ConfigError(
                f"invalid worker id {quoted(worker_id)}: use 1-128 letters, digits, '.', '_', '-'"
            )
        asyncio.run(serve(settings, worker_id))
    except (ConfigError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"error: worker {worker_id} stopped: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f'error: {exc}; install the redis extra: pip install -e ".[redis]"', file=sys.stderr)
        return 2
    return 0
