"""Console chat: commands and streamed replies through stdin/stdout, and the no-model exit."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pytest

from bot.console import CANCELLED, CONSOLE_CHANNEL_ID, Console, history_place
from bot.errors import LENGTH_NOTE
from bot.service import ChatService
from bot.storage.models import Status
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
    assert lines[-2:] == ["settings reset to the model's defaults", "Goodbye!"]
    assert len(engine.submitted) == 2  # "never read" after /quit was not sent
    second = engine.prompt_text(1)
    assert second.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "hello there" in second and engine.submitted[1][1].temperature == 0.4
    stored = await service.recent_messages(CONSOLE_CHANNEL_ID, 10, include_forgotten=True)
    assert [m.content for m in stored if m.role == "user"] == ["hello there", "second message"]
    assert (await service.get_settings(CONSOLE_CHANNEL_ID)).overridden == frozenset()


class TTYInput(io.StringIO):
    """Input that says it is a terminal, as a user's would."""

    def isatty(self) -> bool:
        return True


async def test_a_terminal_session_says_where_the_history_is_and_goodbye(service, db_url):
    out = io.StringIO()
    history = history_place(db_url, CONSOLE_CHANNEL_ID)
    console = Console(
        service, out, channel_id=CONSOLE_CHANNEL_ID, user_name="tester", history=history
    )
    await console.run(TTYInput("/help\n/quit\n"))
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "Chatting with fake@1; /help for commands, /quit to leave."
    assert lines[1] == (
        f"This conversation (number 1) is kept in the SQLite file {db_url.split('///')[1]}; "
        "/forget starts it fresh, --channel N opens another."
    )
    assert text.count(history) == 2  # in the greeting and in /help
    assert text.endswith("> Goodbye!\n")


async def test_end_of_input_at_a_terminal_prompt_says_goodbye(service):
    out = io.StringIO()
    console = Console(service, out, channel_id=CONSOLE_CHANNEL_ID, user_name="tester")
    await console.run(TTYInput(""))
    assert out.getvalue().endswith("> \nGoodbye!\n")


def test_the_history_place_hides_a_server_password():
    line = history_place("postgresql+asyncpg://bot:s3cret@db:5432/bot", 7)
    assert "s3cret" not in line and "postgresql+asyncpg://bot:***@db:5432/bot" in line
    assert "(number 7)" in line


async def test_ctrl_c_during_a_reply_cancels_that_reply_and_the_chat_goes_on(db, settings):
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    service = ChatService(db, engine, settings)
    out = io.StringIO()
    console = Console(service, out, channel_id=CONSOLE_CHANNEL_ID, user_name="tester")
    stdin_w, stdin = _pipe()
    session = asyncio.create_task(console.run(stdin))
    stdin_w.write("tell me a story\n")
    stdin_w.flush()
    await until(lambda: engine.active == 1)  # the reply is being generated (held at the gate)
    console.interrupt()  # what Ctrl-C does
    await until(lambda: CANCELLED in out.getvalue())
    assert not session.done()  # the chat is still there
    gate.set()
    stdin_w.write("second try\n")
    stdin_w.flush()
    await until(lambda: engine.reply_text in out.getvalue() and not console.replying)
    console.interrupt()  # at the prompt: leave
    await asyncio.wait_for(session, 10)
    stdin_w.close()
    assert out.getvalue() == f"{CANCELLED}\n{engine.reply_text}\nGoodbye!\n"
    stored = await service.recent_messages(CONSOLE_CHANNEL_ID, 10, include_forgotten=True)
    assert [(m.role, m.status) for m in stored] == [
        ("user", Status.COMPLETE),
        ("assistant", Status.INTERRUPTED),
        ("user", Status.COMPLETE),
        ("assistant", Status.COMPLETE),
    ]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the console's loop to reach a state (a hang fails the test, after 30 s)."""
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)


def _pipe() -> tuple[TextIO, TextIO]:
    """A real pipe: the console reads its file descriptor as it reads a terminal's."""
    r, w = os.pipe()
    return os.fdopen(w, "w"), os.fdopen(r, "r")


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
            ["no active model in the registry", "make model", "python -m export ensure-default"],
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


def test_ctrl_c_at_the_prompt_of_the_real_console_says_goodbye_and_exits_0(
    tiny_registry, tmp_path: Path
):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(tmp_path),
        "MODEL_REGISTRY": str(tiny_registry.root),
        "DEVICE": "cpu",
        "BOT_CONFIG": "",
    }
    for name in ("MODEL", "DATABASE_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killer = threading.Timer(120, proc.kill)  # a hang fails the test instead of blocking it
    killer.start()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("/persona show\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "no persona: the model's default system prompt applies\n"
        proc.send_signal(signal.SIGINT)  # at the prompt, the engine loaded and idle
        assert proc.stdout.readline() == "Goodbye!\n"  # stdin still open: the signal did it
        out, err = proc.communicate()
    finally:
        killer.cancel()
    assert proc.returncode == 0 and out == "" and err == "", err


async def test_a_reply_cut_by_max_tokens_says_so(db, settings):
    """As on Discord, where a reply cut off by its length says so (and offers Continue)."""
    service = ChatService(db, FakeEngine(cut_after=2, cut_reason="length"), settings)
    out = await run_console(service, "hi\n")
    assert f"Hi there,\n[{LENGTH_NOTE}]\n" in out
    whole = await run_console(ChatService(db, FakeEngine(), settings), "hi\n")
    assert "cut off" not in whole
