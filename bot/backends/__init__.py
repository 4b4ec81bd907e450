"""Generation backends: the in-process engine (LocalBackend) or Redis workers (RedisBackend)."""

from bot.backends.base import (
    BackendStats,
    GenerationBackend,
    ReplyStream,
    RestartPiece,
    WorkerInfo,
)
from bot.backends.local import LocalBackend

__all__ = [
    "BackendStats",
    "GenerationBackend",
    "LocalBackend",
    "ReplyStream",
    "RestartPiece",
    "WorkerInfo",
]
