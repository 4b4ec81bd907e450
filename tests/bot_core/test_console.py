"""Console chat: commands and streamed replies through stdin/stdout, and the no-model exit."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.console import CONSOLE_CHANNEL_ID, Console
from bot.service import ChatService
from tests.bot_core.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """\
hello there
/settings set temperature 0.4
/settings set temperature 9
/settings set top_k
/settings show
/persona set You are terse.
/persona show
second message
/forget
/persona clear
/persona show
/bogus
/settings reset
/quit
never read
"""


async def run_console(service: ChatService, script: str) -> str:
    out = io.StringIO()
    console = Console(service, out, channel_id=CONSOLE_CHANNEL_ID, user_name="tester")
    await console.run(io.StringIO(script))
    return out.getvalue()


async def test_a_piped_session_runs_every_command(service: ChatService, engine: FakeEngine):
    lines = (await run_console(service, SCRIPT)).splitlines()
    reply = engine.reply_text
    assert lines[0] == reply
    assert lines[1] == "temperature = 0.4"
    assert lines[2] == "error: temperature must be between 0 and 2 (got 9)"
    assert lines[3].startswith("usage: /settings set KEY VALUE")
    assert "temperature = 0.4 (set here)" in lines[4:11]
    assert "persona set" in lines and "You are terse." in lines
    assert lines.count(reply) == 2
    assert "forgot 4 turn(s)" in lines and "persona cleared" in lines
    assert "no persona: the model's default system prompt applies" in lines
    assert "unknown command '/bogus'; /help lists the commands" in lines
    assert lines[-1] == "settings reset to the model's defaults"
    assert len(engine.submitted) == 2  # "never read" after /quit was not sent
    second = engine.prompt_text(1)
    assert second.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "hello there" in second and engine.submitted[1][1].temperature == 0.4
    stored = await service.recent_messages(CONSOLE_CHANNEL_ID, 10, include_forgotten=True)
    assert [m.content for m in stored if m.role == "user"] == ["hello there", "second message"]
    assert (await service.get_settings(CONSOLE_CHANNEL_ID)).overridden == frozenset()


async def test_end_of_input_ends_the_session_and_errors_are_shown(db, settings):
    service = ChatService(db, FakeEngine(max_queue=0), settings)
    out = await run_console(service, "/help\nhi\n")
    assert "/settings set KEY VALUE" in out
    assert out.rstrip().endswith(
        "[I'm answering a lot of people right now; please try again in a moment.]"
    )


async def test_a_cut_reply_shows_its_text_then_the_note_on_its_own_line(db, settings):
    service = ChatService(db, FakeEngine(cut_after=2, cut_reason="timeout"), settings)
    out = await run_console(service, "hi\n")
    assert "Hi there,\n[(cut off: this reply hit the time limit)]\n" in out


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            None,
            ["no model version in the registry", "make model", "python -m export ensure-default"],
        ),
        ("nosuch@2", ["no model named 'nosuch'"]),
    ],
)
def test_without_a_usable_model_version_the_console_names_the_fix_and_exits_2(
    tmp_path: Path, model: str | None, expected: list[str]
):
    env = {**os.environ, "DATA_DIR": str(tmp_path), "BOT_CONFIG": "", "PYTHONPATH": str(ROOT)}
    for name in ("MODEL", "MODEL_REGISTRY", "DATABASE_URL"):
        env.pop(name, None)
    if model:
        env["MODEL"] = model
    done = subprocess.run(
        [sys.executable, "-m", "bot", "chat"],
        cwd=tmp_path,
        env=env,
        input="hello\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    for fragment in expected:
        assert fragment in done.stderr
    assert done.stdout == ""
