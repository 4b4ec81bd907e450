"""Generation settings: ranges (Discord enforces them too), one-line errors, one mapping."""

from __future__ import annotations

import argparse
import math

import pytest

from bot.engine.cli import add_generate_arguments, sampling_from_args
from bot.errors import QUOTE_CHARS, fitted, quoted
from bot.generation import (
    SETTINGS,
    SettingsError,
    effective_settings,
    find_setting,
    model_defaults,
    validate_changes,
    validate_setting,
)
from bot.service import ChatService
from bot.turns import Speaker
from tests.bot_core.fakes import FakeEngine

RANGES = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "top_k": (0, 1000),
    "max_tokens": (1, 1024),
    "repetition_penalty": (1, 2),
    "no_repeat_ngram": (0, 10),
}


@pytest.mark.parametrize(("key", "bounds"), RANGES.items())
def test_bounds_are_inclusive_and_just_outside_is_refused(key, bounds):
    low, high = bounds
    assert validate_setting(key, low) == low
    assert validate_setting(key, high) == high
    step = 1 if find_setting(key).kind is int else 0.001
    for bad in (low - step, high + step):
        with pytest.raises(SettingsError) as info:
            validate_setting(key, bad)
        message = str(info.value)
        assert message.startswith(f"{key} must be between {low:g} and {high:g}")
        assert "\n" not in message


def test_strings_from_a_console_are_converted():
    assert validate_setting("temperature", " 0.25 ") == 0.25
    assert validate_setting("TOP_K", "40") == 40
    assert validate_setting("max_tokens", "1e3") == 1000
    assert validate_setting("seed", "none") is None
    assert validate_setting("seed", "123") == 123


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("top_k", 2.5, "must be a whole number"),
        ("max_tokens", "12.5", "must be a whole number"),
        ("temperature", "warm", "must be a number"),
        ("temperature", True, "must be a number"),
        ("temperature", math.nan, "must be between"),
        ("top_p", "inf", "must be between"),
        ("max_tokens", 0, "must be between 1 and 1024"),
        ("colour", 1, "unknown setting 'colour'"),
    ],
)
def test_bad_values_give_one_clear_line(key, value, fragment):
    with pytest.raises(SettingsError) as info:
        validate_setting(key, value)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_validate_changes_checks_every_value_and_refuses_an_empty_change():
    assert validate_changes({"temperature": 1, "top_k": "3"}) == {"temperature": 1.0, "top_k": 3}
    with pytest.raises(SettingsError, match="top_p must be between"):
        validate_changes({"temperature": 1, "top_p": 2})
    with pytest.raises(SettingsError, match="nothing to change"):
        validate_changes({})


def test_model_defaults_come_from_the_manifest_and_are_clamped():
    values = model_defaults(
        {
            "temperature": 0.3,
            "top_p": 0.95,
            "max_new_tokens": 4096,
            "repetition_penalty": 0.9,
            "top_k": "bad",
            "no_repeat_ngram_size": 3,
        }
    )
    assert values["temperature"] == 0.3 and values["top_p"] == 0.95
    assert values["max_new_tokens"] == 1024  # clamped to the channel range
    assert values["repetition_penalty"] == 1.0
    assert values["top_k"] == SETTINGS["top_k"].default  # unusable value ignored
    assert values["no_repeat_ngram_size"] == 3
    assert model_defaults(None)["temperature"] == SETTINGS["temperature"].default


def test_effective_settings_layer_overrides_on_defaults():
    s = effective_settings({"temperature": 0.3}, {"temperature": None, "top_k": 7, "bogus": 1})
    assert s.temperature == 0.3 and s.top_k == 7
    assert s.overridden == frozenset({"top_k"})
    lines = s.describe()
    assert "top_k = 7 (set here)" in lines and "temperature = 0.3" in lines


def test_a_huge_number_is_a_one_line_settings_error_not_an_overflow():
    for key in ("max_tokens", "temperature"):
        for value in (10**400, -(10**400), str(10**400)):
            with pytest.raises(SettingsError) as info:
                validate_setting(key, value)
            message = str(info.value)
            assert message.startswith(f"{key} must be between") and len(message) < 100


def test_users_may_type_the_label_or_the_engine_name():
    assert validate_changes({"max_tokens": 5, "no_repeat_ngram_size": "2"}) == {
        "max_new_tokens": 5,
        "no_repeat_ngram_size": 2,
    }
    assert effective_settings(None, {"max_new_tokens": 9}).describe()[3] == (
        "max_tokens = 9 (set here)"
    )


async def test_the_cli_and_discord_sample_a_version_the_same_way(db, settings):
    """`python -m bot generate` and a channel without overrides turn one manifest (SmolLM2's
    generation section: no top_k, no repetition penalty) into the same sampling parameters."""
    generation = {"temperature": 0.2, "top_p": 0.9, "do_sample": True, "max_new_tokens": 300}
    engine = FakeEngine(generation=generation)
    service = ChatService(db, engine, settings)
    async with service.ask("hi", channel_id=5, author=Speaker(1, "ann")) as reply:
        async for _ in reply:
            pass
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    from_cli = sampling_from_args(parser.parse_args(["--prompt", "hi"]), engine.model)
    assert from_cli == engine.submitted[0][1]
    assert (from_cli.top_k, from_cli.repetition_penalty) == (50, 1.1)  # the schema's defaults
    assert (from_cli.temperature, from_cli.max_new_tokens) == (0.2, 300)
    flags = ["--prompt", "hi", "--top-p", "0", "--max-new-tokens", "7"]
    chosen = sampling_from_args(parser.parse_args(flags), engine.model)
    assert (chosen.top_p, chosen.top_k, chosen.max_new_tokens) == (1.0, 1, 7)  # as a channel's
    with pytest.raises(SettingsError, match="top_k must be between 0 and 1000"):
        sampling_from_args(parser.parse_args(["--prompt", "hi", "--top-k", "5000"]), engine.model)


def test_a_huge_value_or_setting_name_is_quoted_cut_to_fit():
    """5,000 digits pass no int() (Python's parsing limit), 5,000 letters name no setting: the
    error quotes a little of each, so the reply fits a Discord message."""
    for key, value in (("temperature", "9" * 5000), ("max_tokens", "x" * 5000), ("t" * 5000, 1)):
        with pytest.raises(SettingsError) as caught:
            validate_setting(key, value)
        assert len(str(caught.value)) < 400, str(caught.value)[:100]


def test_quoted_and_fitted_cut_what_users_typed():
    assert quoted("short") == "'short'"
    long = quoted("y" * 5000)
    assert len(long) == QUOTE_CHARS and long.endswith("...'")
    assert fitted("z" * 5000) == "z" * 1999 + "…" and fitted("ok") == "ok"
