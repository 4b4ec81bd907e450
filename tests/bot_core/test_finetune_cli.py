"""`python -m bot finetune`: the operator's job, end to end in a subprocess: stored conversations
in, a new published (not activated) version out, the opted-out user's words left out; and the
one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bot.finetune.runner import job_folder
from bot.storage.db import Database
from bot.storage.models import Channel, Message, Role, UserPrivacy
from export.registry import Registry
from tests.bot_core.conftest import sqlite_url

ROOT = Path(__file__).resolve().parents[2]
GUILD, SECRET = 77, "zebracorn"


def bot_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,  # a safety net: a tiny job takes seconds alone, minutes on a busy machine
    )


async def store(url: str, channels: int) -> None:
    """`channels` channels of two exchanges each and one of an opted-out user, in a new database."""
    db = await Database.open(url)
    try:
        await _store(db, channels)
    finally:
        await db.close()


async def _store(db: Database, channels: int) -> None:
    async with db.session() as s, s.begin():
        s.add(UserPrivacy(user_id=9, opted_out=True))
        for cid in range(100, 100 + channels):
            s.add(Channel(id=cid, guild_id=GUILD))
            for k in range(2):
                s.add(Message(channel_id=cid, author_id=1, author_name="ann", role=Role.USER,
                              content=f"what about {cid}.{k}?"))  # fmt: skip
                s.add(Message(channel_id=cid, role=Role.ASSISTANT, content=f"{cid}.{k} is fine"))
            s.add(Message(channel_id=cid, author_id=9, author_name="olga", role=Role.USER,
                          content=f"my {SECRET}"))  # fmt: skip
            s.add(Message(channel_id=cid, role=Role.ASSISTANT, content=f"your {SECRET} is safe"))


@pytest.fixture
def layout(tiny_registry, tmp_path: Path) -> tuple[dict[str, str], Path]:
    data = tmp_path / "data"
    registry = data / "registry"
    shutil.copytree(tiny_registry.root, registry)
    env = {"DATA_DIR": str(data), "DATABASE_URL": sqlite_url(data / "bot.db"), "DISCORD_TOKEN": ""}
    return env, registry


async def test_an_operator_tunes_a_server_from_the_command_line(layout):
    env, registry = layout
    await store(env["DATABASE_URL"], channels=6)
    active = Registry(registry).active()
    assert active is not None
    done = bot_cli("finetune", "--guild", str(GUILD), "--steps", "2", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("job 1: ") and "published tiny@" in done.stdout
    new = done.stdout.rsplit("published ", 1)[1].split(":", 1)[0]
    manifest = Registry(registry).resolve(new).manifest()
    assert manifest.finetune is not None and manifest.finetune.perplexity_after > 0
    assert Registry(registry).active().ref == active.ref  # published, not activated
    written = "".join(p.read_text() for p in job_folder(Path(env["DATA_DIR"]), 1).glob("*.jsonl"))
    assert "what about" in written and SECRET not in written


async def test_too_little_data_and_bad_steps_are_one_line(layout):
    env, _ = layout
    await store(env["DATABASE_URL"], channels=1)
    few = bot_cli("finetune", "--guild", str(GUILD), env=env)
    assert few.returncode == 2 and few.stderr.count("\n") == 1
    assert few.stderr.startswith("error: not enough stored conversations")
    steps = bot_cli("finetune", "--guild", str(GUILD), "--steps", "0", env=env)
    assert steps.returncode == 2 and steps.stderr.startswith("error: --steps must be between")
