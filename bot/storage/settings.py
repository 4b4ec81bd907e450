"""Per-channel generation settings: ranges, validation with one-line errors, model defaults."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


class SettingsError(ValueError):
    """A setting that is unknown or out of range; the message is one friendly line."""


@dataclass(frozen=True)
class Limit:
    """The allowed range of one setting (Discord's app-command ranges use the same numbers)."""

    kind: type  # int or float
    low: float
    high: float
    default: float
    help: str
    optional: bool = False  # None allowed (means: not set)


LIMITS: dict[str, Limit] = {
    "temperature": Limit(float, 0, 2, 0.7, "randomness; 0 = always the most likely word"),
    "top_p": Limit(float, 0, 1, 0.9, "nucleus sampling: keep the likeliest words up to this mass"),
    "top_k": Limit(int, 0, 1000, 50, "keep only the k likeliest words; 0 = no limit"),
    "max_tokens": Limit(int, 1, 1024, 256, "longest reply, in tokens"),
    "repetition_penalty": Limit(float, 1, 2, 1.1, "discourage repeating earlier tokens; 1 = off"),
    "no_repeat_ngram": Limit(int, 0, 10, 0, "never repeat a phrase of this many tokens; 0 = off"),
    "seed": Limit(int, 0, 2**31 - 1, 0, "fixed seed for reproducible replies; none = random", True),
}

# generation_config.json names -> ours (the manifest's `generation` section)
MANIFEST_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_tokens",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram",
}


class ChannelSettings(BaseModel):
    """The settings a channel generates with: its overrides on top of the model's defaults."""

    model_config = ConfigDict(frozen=True)

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_tokens: int = 256
    repetition_penalty: float = 1.1
    no_repeat_ngram: int = 0
    seed: int | None = None
    overridden: frozenset[str] = frozenset()  # the keys this channel set itself

    def values(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in LIMITS}

    def describe(self) -> list[str]:
        """One line per setting, marking the channel's own values."""
        lines = []
        for key, value in self.values().items():
            shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else value
            mark = " (set here)" if key in self.overridden else ""
            lines.append(f"{key} = {shown}{mark}")
        return lines


def _range(key: str, limit: Limit) -> str:
    low, high = (int(limit.low), int(limit.high)) if limit.kind is int else (limit.low, limit.high)
    return f"{key} must be between {low:g} and {high:g}"


def validate_setting(key: str, value: Any) -> int | float | None:
    """The value converted and range-checked (strings accepted, as typed in a console)."""
    name = str(key).strip().lower()
    limit = LIMITS.get(name)
    if limit is None:
        raise SettingsError(f"unknown setting {key!r}; one of: {', '.join(LIMITS)}")
    if isinstance(value, str):
        text = value.strip()
        if limit.optional and text.lower() in ("none", "off", "random", ""):
            return None
        try:
            value = float(text) if limit.kind is float or "." in text or "e" in text else int(text)
        except ValueError:
            raise SettingsError(f"{name} must be a number (got {value!r})") from None
    if value is None and limit.optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number (got {value!r})")
    if math.isnan(value) or not limit.low <= value <= limit.high:
        raise SettingsError(f"{_range(name, limit)} (got {value:g})")
    if limit.kind is int:
        if value != int(value):
            raise SettingsError(f"{name} must be a whole number (got {value:g})")
        return int(value)
    return float(value)


def validate_changes(changes: Mapping[str, Any]) -> dict[str, int | float | None]:
    """Every change validated; the first bad one raises SettingsError."""
    if not changes:
        raise SettingsError(f"nothing to change; settings: {', '.join(LIMITS)}")
    return {str(k).strip().lower(): validate_setting(k, v) for k, v in changes.items()}


def model_defaults(generation: Mapping[str, Any] | None) -> dict[str, int | float | None]:
    """Defaults from a manifest's `generation` section, clamped into our ranges."""
    values: dict[str, int | float | None] = {
        key: None if limit.optional else limit.kind(limit.default) for key, limit in LIMITS.items()
    }
    for source, key in MANIFEST_KEYS.items():
        raw = (generation or {}).get(source)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
            continue
        limit = LIMITS[key]
        clamped = min(max(raw, limit.low), limit.high)
        values[key] = int(clamped) if limit.kind is int else float(clamped)
    if (generation or {}).get("do_sample") is False:  # the model's authors ask for greedy
        values["temperature"] = 0.0
    return values


def effective_settings(
    generation: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> ChannelSettings:
    """The model's defaults with the channel's non-null overrides on top."""
    values = model_defaults(generation)
    own = {k: v for k, v in overrides.items() if k in LIMITS and v is not None}
    values.update(own)
    return ChannelSettings(**values, overridden=frozenset(own))
