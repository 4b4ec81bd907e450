"""Channel settings in the engine's terms: the sampling parameters of one request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine import SamplingParams
from bot.storage.settings import ChannelSettings, effective_settings

if TYPE_CHECKING:
    from bot.engine import LoadedModel


def sampling_params(s: ChannelSettings, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Channel settings in the engine's terms (top_p 0, its limit, keeps only the top token)."""
    return SamplingParams(
        stop=stop,
        temperature=s.temperature,
        top_p=s.top_p if s.top_p > 0 else 1.0,
        top_k=s.top_k if s.top_p > 0 else 1,
        max_new_tokens=s.max_tokens,
        repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram,
        seed=s.seed,
    )


def generation_settings(model: LoadedModel, overrides: dict[str, Any]) -> ChannelSettings:
    """A channel's settings for one request: the reply budget never takes over half the context."""
    settings = effective_settings(model.manifest.generation, overrides)
    cap = max(1, model.max_context // 2)
    return settings.model_copy(update={"max_tokens": min(settings.max_tokens, cap)})
