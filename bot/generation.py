"""Generation settings, one home: names, ranges, defaults, help, validation, sampling parameters.

Every setting is named as the engine's `SamplingParams` field (and the manifest's `generation`
section, which holds generation_config.json's names). Users type a shorter `label` for two of
them (`max_tokens`, `no_repeat_ngram`): Discord's options, the console and `describe()` show it,
and `validate_setting` accepts either name. The Discord cog, the console's help and the
`generate` CLI take their ranges and help from `SETTINGS`; the bot and the CLI turn a version's
defaults into sampling parameters with the same `version_params`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from bot.engine.types import SamplingParams
from bot.errors import quoted

if TYPE_CHECKING:
    from bot.engine import LoadedModel


class SettingsError(ValueError):
    """A setting that is unknown or out of range; the message is one friendly line."""


@dataclass(frozen=True)
class Setting:
    """One generation setting: its range (Discord's option ranges too), default and help."""

    name: str  # the SamplingParams field and manifest key
    kind: type  # int or float
    low: float
    high: float
    default: float
    help: str
    label: str = ""  # the name users type, when it differs from `name`
    optional: bool = False  # None allowed (means: not set)

    @property
    def shown_name(self) -> str:
        return self.label or self.name

    def range_text(self) -> str:
        """ "0-2", "1-1024": the range as users read it."""
        return f"{self.low:g}-{self.high:g}"

    def describe(self) -> str:
        """Help with the range, for Discord's option descriptions and command-line flags."""
        return f"{self.help} ({self.range_text()})"


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("temperature", float, 0, 2, 0.7, "randomness; 0 = always the likeliest token"),
        Setting("top_p", float, 0, 1, 0.9, "nucleus sampling mass; 0 = only the likeliest token"),
        Setting("top_k", int, 0, 1000, 50, "sample among the k likeliest tokens; 0 = all"),
        Setting("max_new_tokens", int, 1, 1024, 256, "longest reply in tokens", "max_tokens"),
        Setting("repetition_penalty", float, 1, 2, 1.1, "penalty on repeated tokens; 1 = off"),
        Setting(
            "no_repeat_ngram_size",
            int,
            0,
            10,
            0,
            "forbid repeating n-grams of this size; 0 = off",
            "no_repeat_ngram",
        ),
        Setting(
            "seed",
            int,
            0,
            2**31 - 1,
            0,
            "fixed seed for reproducible replies; none = random",
            optional=True,
        ),
    )
}
BY_LABEL = {s.shown_name: s for s in SETTINGS.values()} | SETTINGS  # either name finds one


class ChannelSettings(BaseModel):
    """The settings a channel generates with: its overrides on top of the model's defaults."""

    model_config = ConfigDict(frozen=True)

    temperature: float = SETTINGS["temperature"].default
    top_p: float = SETTINGS["top_p"].default
    top_k: int = int(SETTINGS["top_k"].default)
    max_new_tokens: int = int(SETTINGS["max_new_tokens"].default)
    repetition_penalty: float = SETTINGS["repetition_penalty"].default
    no_repeat_ngram_size: int = int(SETTINGS["no_repeat_ngram_size"].default)
    seed: int | None = None
    overridden: frozenset[str] = frozenset()  # the settings this channel set itself
    from_server: frozenset[str] = frozenset()  # the settings its server's defaults set

    def values(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    def shown(self, key: str) -> str:
        """`label = value` for one setting, as users read it."""
        setting = BY_LABEL[key]
        value = getattr(self, setting.name)
        text = "none" if value is None else f"{value:g}" if isinstance(value, float) else value
        return f"{setting.shown_name} = {text}"

    def describe(self) -> list[str]:
        """One line per setting, marking the channel's own values and its server's defaults."""
        return [
            self.shown(key)
            + (
                " (set here)"
                if key in self.overridden
                else " (server default)"
                if key in self.from_server
                else ""
            )
            for key in SETTINGS
        ]


def find_setting(key: str) -> Setting:
    """The setting a user means by `key` (its name or its label); SettingsError if none."""
    setting = BY_LABEL.get(str(key).strip().lower())
    if setting is None:
        names = ", ".join(s.shown_name for s in SETTINGS.values())
        raise SettingsError(f"unknown setting {quoted(key)}; one of: {names}")
    return setting


def validate_setting(key: str, value: Any) -> int | float | None:
    """The value converted and checked, type before range (strings accepted, as typed in a
    console); SettingsError with one line naming the setting as the user typed it."""
    setting = find_setting(key)
    name = str(key).strip().lower()
    if isinstance(value, str):
        text = value.strip()
        if setting.optional and text.lower() in ("none", "off", "random", ""):
            return None
        try:
            whole = setting.kind is int and not any(c in text.lower() for c in ".en")
            value = int(text) if whole else float(text)
        except ValueError:
            raise SettingsError(f"{name} must be a number (got {quoted(value)})") from None
    if value is None and setting.optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number (got {quoted(value)})")
    limits = f"{name} must be between {setting.low:g} and {setting.high:g}"
    if isinstance(value, int) and not setting.low <= value <= setting.high:  # exact at any size
        shown = value if abs(value) < 10**12 else "a number far out of range"
        raise SettingsError(f"{limits} (got {shown})")
    integral = isinstance(value, int) or not math.isfinite(value) or value.is_integer()
    if setting.kind is int and not integral:
        raise SettingsError(f"{name} must be a whole number (got {value:g})")
    number = float(value)  # in range if an int, so it fits a float
    if math.isnan(number) or not setting.low <= number <= setting.high:
        raise SettingsError(f"{limits} (got {number:g})")
    return int(number) if setting.kind is int else number


def validate_changes(changes: Mapping[str, Any]) -> dict[str, int | float | None]:
    """Every change validated and keyed by its setting's name; the first bad one raises."""
    if not changes:
        names = ", ".join(s.shown_name for s in SETTINGS.values())
        raise SettingsError(f"nothing to change; settings: {names}")
    return {find_setting(k).name: validate_setting(k, v) for k, v in changes.items()}


def model_defaults(generation: Mapping[str, Any] | None) -> dict[str, int | float | None]:
    """Defaults from a manifest's `generation` section, clamped into our ranges."""
    values: dict[str, int | float | None] = {}
    for key, setting in SETTINGS.items():
        values[key] = None if setting.optional else setting.kind(setting.default)
        raw = (generation or {}).get(key)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
            continue
        clamped = min(max(raw, setting.low), setting.high)
        values[key] = int(clamped) if setting.kind is int else float(clamped)
    if (generation or {}).get("do_sample") is False:  # the model's authors ask for greedy
        values["temperature"] = 0.0
    return values


def effective_settings(
    generation: Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
    server: Mapping[str, Any] | None = None,
) -> ChannelSettings:
    """The model's defaults, then the server's non-null defaults (`server`), then the channel's
    non-null overrides on top."""
    values = model_defaults(generation)
    shared = {k: v for k, v in (server or {}).items() if k in SETTINGS and v is not None}
    own = {k: v for k, v in overrides.items() if k in SETTINGS and v is not None}
    values.update(shared)
    values.update(own)
    return ChannelSettings(**values, overridden=frozenset(own), from_server=frozenset(shared))


def generation_settings(model: LoadedModel, overrides: Mapping[str, Any]) -> ChannelSettings:
    """A channel's settings for one request: the reply budget never takes over half the context."""
    settings = effective_settings(model.manifest.generation, overrides)
    cap = max(1, model.max_context // 2)
    return settings.model_copy(update={"max_new_tokens": min(settings.max_new_tokens, cap)})


def sampling_params(s: ChannelSettings, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Settings in the engine's terms (top_p 0, its limit, keeps only the top token)."""
    return SamplingParams(
        stop=stop,
        temperature=s.temperature,
        top_p=s.top_p if s.top_p > 0 else 1.0,
        top_k=s.top_k if s.top_p > 0 else 1,
        max_new_tokens=s.max_new_tokens,
        repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size,
        seed=s.seed,
    )


def version_params(model: LoadedModel, **overrides: Any) -> SamplingParams:
    """How a version samples: as a channel without overrides does (the same defaults from the
    manifest), then `overrides` that are not None: settings (validated against SETTINGS, never
    capped) and engine-only fields (min_p, stop, greedy, ...). `python -m bot generate` uses it."""
    given = {key: value for key, value in overrides.items() if value is not None}
    settable = {key: value for key, value in given.items() if key in SETTINGS}
    chosen = validate_changes(settable) if settable else {}
    settings = generation_settings(model, {}).model_copy(update=chosen)
    return replace(
        sampling_params(settings), **{k: v for k, v in given.items() if k not in SETTINGS}
    )
