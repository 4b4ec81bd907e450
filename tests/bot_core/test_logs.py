"""The bot's logging set-up: levels, JSON lines, and the token kept out of every line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bot.logs import configure_logging

TOKEN = "MTIzNDU2Nzg5.secret-token.abcdefghijklmnop"


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _log_everything(logger: logging.Logger) -> None:
    logger.debug("connecting with %s", TOKEN)
    logger.info(f"header Authorization: Bot {TOKEN}")
    try:
        raise RuntimeError(f"login failed for {TOKEN}")
    except RuntimeError:
        logger.exception("login")
    logger.warning("a %s", {"token": TOKEN}, stack_info=True)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_token_never_reaches_the_log_at_any_level(restore_root, fmt) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", fmt, secrets=[TOKEN], stream=out)
    _log_everything(logging.getLogger("discord.http"))
    text = out.getvalue()
    assert TOKEN not in text
    assert text.count("[redacted]") == 4  # argument, f-string, exception text, dict argument
    assert "RuntimeError" in text  # the traceback itself is kept


def test_json_lines_parse_with_level_logger_and_extras(restore_root) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = logging.getLogger("bot.test")
    log.debug("not shown")
    log.info("reply done in %d ms", 42, extra={"channel_id": 7})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "INFO" and entry["logger"] == "bot.test"
    assert entry["message"] == "reply done in 42 ms" and entry["channel_id"] == 7
    assert entry["time"].endswith("+00:00")


def test_levels_filter_and_a_second_call_replaces_the_handler(restore_root) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("WARNING", stream=first)
    configure_logging("ERROR", stream=second)
    logging.getLogger("x").warning("quiet")
    logging.getLogger("x").error("loud")
    assert first.getvalue() == ""
    assert second.getvalue().count("loud") == 1 and "quiet" not in second.getvalue()


def test_unknown_level_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD': use one of DEBUG, INFO"):
        configure_logging("LOUD")
