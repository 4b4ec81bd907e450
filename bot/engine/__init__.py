"""ONNX Runtime decoding engine with continuous batching (see docs/architecture.md, "Engine")."""

from bot.engine.engine import Engine
from bot.engine.loader import LoadedModel, load_model
from bot.engine.stream import Stream
from bot.engine.types import (
    EngineClosedError,
    EngineError,
    GenerationResult,
    ModelLoadError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineError",
    "GenerationResult",
    "LoadedModel",
    "ModelLoadError",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "Stream",
    "load_model",
]
