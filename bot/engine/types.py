"""Public value types of the engine: sampling parameters, results and errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class EngineError(Exception):
    """Base of the engine's one-line, user-facing errors."""


class QueueFullError(EngineError):
    """The request queue is full: the engine is busy, try again later."""


class PromptTooLongError(EngineError):
    """The prompt does not fit the context window minus the tokens to generate."""


class EngineClosedError(EngineError):
    """The engine is closed (the bot is shutting down): it takes no more requests."""


class ModelLoadError(EngineError):
    """A model version that cannot be found or loaded."""


def check_prompt(
    prompt: Sequence[int], *, vocab: int | None, max_context: int, max_new_tokens: int
) -> None:
    """What every backend refuses before queueing: an empty prompt or ids outside the
    vocabulary (ValueError), a prompt that leaves no room for `max_new_tokens` in the context
    (PromptTooLongError)."""
    if len(prompt) == 0:
        raise ValueError("the prompt must be a non-empty list of token ids")
    if vocab and (min(prompt) < 0 or max(prompt) >= vocab):
        raise ValueError(f"token ids must be in 0..{vocab - 1}")
    limit = max_context - max_new_tokens
    if len(prompt) > limit:
        raise PromptTooLongError(
            f"the prompt has {len(prompt)} tokens but at most {max(limit, 0)} fit "
            f"({max_context} context - {max_new_tokens} new tokens)"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens; temperature 0 (or greedy=True) means argmax."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()  # stop strings (cut from the text)
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's stop tokens
    ignore_eos: bool = False  # never stop on a stop token (benchmarks)
    seed: int | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (
                self.top_p is None or 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p}",
            ),
            (
                self.min_p is None or 0 <= self.min_p <= 1,
                f"min_p must be in [0, 1], got {self.min_p}",
            ),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.no_repeat_ngram_size is None or self.no_repeat_ngram_size >= 0,
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}",
            ),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for /stats and monitoring."""

    queued: int  # requests waiting for a KV slot
    active: int  # requests holding a KV slot (on every loaded version during a hot swap)
    slots: int  # KV slots of the current version
    model: str  # NAME@N of the current version
    provider: str  # "cuda" or "cpu"


@dataclass
class GenerationResult:
    """The final record of one request."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    text: str = ""
    finish_reason: str = "error"  # one of FINISH_REASONS
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0  # submit -> admitted into a slot
    ttft_ms: float = 0.0  # submit -> first token
    tokens_per_s: float = 0.0  # completion tokens / (last token - first token)
    error: str | None = None
    model: str = ""  # NAME@N that produced it
    cached_tokens: int = 0  # prompt tokens whose KV was kept from an earlier request

    def timings(self) -> dict[str, float]:
        return {
            "queue_ms": round(self.queue_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }
