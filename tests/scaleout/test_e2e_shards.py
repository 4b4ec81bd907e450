"""End to end on the scale-out layout: the fake Discord, two bot processes (shards 0 and 1 of
2), workers as processes, PostgreSQL and Redis. Mentions in guilds of both shards are answered
by the shard that holds them, in order per channel; a worker killed with kill -9 mid-reply still
ends in one complete reply; every turn is stored once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.backends.redis_backend import connect
from bot.storage import repo
from bot.storage.db import Database
from bot.storage.migrate import run_command
from tests.fakediscord import FakeDiscord
from tests.scaleout.conftest import REDIS_URL, needs_redis

PG_URL = os.environ.get("BOT_TEST_POSTGRES_URL")
pytestmark = [
    needs_redis,
    pytest.mark.skipif(
        not PG_URL, reason="BOT_TEST_POSTGRES_URL not set (`make test` starts a PostgreSQL)"
    ),
]
ROOT = Path(__file__).resolve().parents[2]


def guild_on_shard(shard: int, count: int, n: int) -> int:
    return ((count * (2_000_000 + n) + shard) << 22) | 777


@pytest.fixture
async def pg():
    db = Database(PG_URL)
    await run_command(db.engine, "downgrade", "base")
    await run_command(db.engine, "upgrade", "head")  # once, before the shards start
    yield db
    await run_command(db.engine, "downgrade", "base")
    await db.close()


class Processes:
    """Bot and worker processes of one test, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.running[name] = proc
        return proc

    def check(self) -> None:
        for name, proc in self.running.items():
            if proc.poll() is not None and proc.returncode not in (0, -9):
                text = (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{text}")

    def kill9(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, name: str) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


async def until(fake: FakeDiscord, procs: Processes, check, timeout: float = 120) -> Any:
    async def poll() -> Any:
        while True:
            procs.check()
            value = check()
            if value:
                return value
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout)


async def until_async(procs: Processes, check, timeout: float = 120) -> None:
    async def poll() -> None:
        while not await check():
            procs.check()
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


def same_text(shown: str, stored: str) -> bool:
    """Discord shows the stored text of one reply (the tiny model's random output may hold NUL,
    which PostgreSQL keeps as U+FFFD), maybe followed by a note such as the history-cut one."""
    shown = shown.replace("\x00", "\ufffd").strip()
    return bool(stored.strip()) and shown.startswith(stored.strip())


def bot_messages(fake: FakeDiscord, channel: int) -> list[dict[str, Any]]:
    """The bot's replies to messages in a channel (not its answers to slash commands)."""
    return [
        m
        for m in fake.channel_messages(channel)
        if m["author"]["id"] == fake.bot_user["id"] and m.get("message_reference")
    ]


async def history(db: Database, channel: int) -> list[Any]:
    async with db.session() as s:
        return await repo.history(s, channel, 100)


async def test_two_shards_and_workers_answer_every_guild_once_and_survive_a_killed_worker(
    pg: Database, prefix: str, two_versions, tmp_path: Path
):
    async with FakeDiscord(n_channels=1) as fake:
        guilds = [fake.add_guild(f"g{i}", guild_on_shard(i % 2, 2, i)) for i in range(4)]
        channels = [fake.add_channel(f"c{i}", guilds[i // 2]) for i in range(8)]
        alice = fake.add_user("alice")
        env = {
            **os.environ,
            "DISCORD_TOKEN": "fake-token",
            "DISCORD_API_BASE": fake.api_base,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DATABASE_URL": PG_URL,
            "REDIS_URL": REDIS_URL,
            "REDIS_PREFIX": prefix,
            "MODEL_REGISTRY": str(two_versions.root),
            "DATA_DIR": str(tmp_path),
            "DEVICE": "cpu",
            "ENGINE_SLOTS": "4",
            "ENGINE_THREADS": "1",
            "EDIT_INTERVAL_S": "0",
            "USER_RATE_PER_MIN": "1000",
            "CHANNEL_RATE_PER_MIN": "1000",
            "WORKER_CLAIM_IDLE_S": "2",
            "WORKER_HEARTBEAT_S": "0.3",
            "SHARD_COUNT": "2",
            "COMMAND_GUILD_IDS": ",".join(map(str, guilds)),
            "BOT_CONFIG": "",
            "ADMIN_USER_IDS": fake.owner["id"],
        }
        procs = Processes(env, tmp_path)
        try:
            for shard in (0, 1):
                procs.start(f"shard{shard}", ["-m", "bot", "run"], SHARD_IDS=str(shard))
            for n in (1, 2):
                procs.start(f"worker{n}", ["-m", "bot", "worker", "--id", f"w{n}"])
            await until(fake, procs, lambda: fake.connected == 2)
            assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)]

            # every channel of every guild, two messages each, all at once
            mention = f"<@{fake.bot_user['id']}>"
            for round_ in (1, 2):
                for channel in channels:
                    await fake.dispatch_message(
                        channel, alice, f"{mention} hello {round_}", mentions=[fake.bot_user]
                    )
            await until(fake, procs, lambda: all(len(bot_messages(fake, c)) >= 2 for c in channels))

            async def answered(channel: int) -> bool:
                rows = await history(pg, channel)
                return len(rows) == 4 and all(r.status == "complete" for r in rows)

            for channel in channels:
                await until_async(procs, lambda c=channel: answered(c))
                rows = await history(pg, channel)
                assert [r.role for r in rows] == ["user", "assistant"] * 2
                assert [r.content.split()[-1] for r in rows[::2]] == ["1", "2"]  # in order
                shown = bot_messages(fake, channel)
                assert len(shown) == 2  # one message per reply: one shard answered
                for row, message in zip(rows[1::2], shown, strict=True):
                    assert same_text(message["content"], row.content)

            # /stats on a shard lists both workers from their heartbeats
            interaction = await fake.dispatch_interaction(channels[0], fake.owner, "stats")
            callback = await fake.wait_for(
                lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"), 60
            )
            text = callback.json["data"]["content"]
            assert "workers: 2" in text and "model: tiny@1 on cpu" in text, text
            # a heartbeat is a snapshot (every second): a reply just finished may still count
            for worker in ("w1", "w2"):
                assert re.search(rf"  {worker}: tiny@1 on cpu, \d of 4 slots busy", text), text

            # a worker killed with kill -9 mid-reply: the reply still ends complete, once
            procs.stop("worker1")
            procs.stop("worker2")
            procs.start("stalls", ["-m", "tests.scaleout.stalling_worker", "stalls"])
            target = channels[0]
            await fake.dispatch_message(
                target, alice, f"{mention} tell me more", mentions=[fake.bot_user]
            )
            client = connect(REDIS_URL)
            try:

                async def first_piece_written() -> bool:
                    async for key in client.scan_iter(match=f"{prefix}:reply:*"):
                        events = await client.xrange(key)
                        if any('"t":"p"' in fields["d"] for _, fields in events):
                            return True
                    return False

                await until_async(procs, first_piece_written)
            finally:
                await client.aclose()
            procs.kill9("stalls")
            procs.start("worker3", ["-m", "bot", "worker", "--id", "w3"])

            async def six_complete() -> bool:
                rows = await history(pg, target)
                return len(rows) == 6 and all(r.status == "complete" for r in rows)

            await until_async(procs, six_complete)
            rows = await history(pg, target)
            shown = bot_messages(fake, target)
            assert len(shown) == 3  # the restarted reply replaced its partial message
            assert same_text(shown[-1]["content"], rows[-1].content)
        finally:
            procs.stop_all()
