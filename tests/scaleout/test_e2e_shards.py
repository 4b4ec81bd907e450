"""End to end on the scale-out layout: the fake Discord, two bot processes (shards 0 and 1 of
2), workers as processes, PostgreSQL and Redis. Mentions in guilds of both shards are answered
by the shard that holds them, in order per channel; a worker killed with kill -9 mid-reply still
ends in one complete reply; `/model use` while a reply streams moves both shards and both
workers to the new version; a shard killed with kill -9 mid-reply, restarted, notes the cut reply
and answers what waited in its inbox; every turn is stored once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.backends.redis_backend import connect
from bot.storage import repo
from bot.storage.db import Database
from bot.storage.migrate import run_command
from bot.storage.models import Message
from tests.e2e.helpers import same_text
from tests.fakediscord import FakeDiscord
from tests.scaleout.conftest import REDIS_URL, needs_redis, stop_process
from tests.scaleout.gated_worker import hold_key

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
        stop_process(self.running.pop(name))

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


@dataclass
class Layout:
    """The fake Discord with 4 guilds (guild i on shard i % 2) of 2 channels each (channel c in
    guild c // 2), and the processes of one test, configured for PostgreSQL and Redis."""

    fake: FakeDiscord
    procs: Processes
    guilds: list[int]
    channels: list[int]
    prefix: str

    @property
    def mention(self) -> str:
        return f"<@{self.fake.bot_user['id']}>"

    def shard_of(self, channel: int) -> int:
        return self.guilds.index(int(self.fake.channels[channel]["guild_id"])) % 2

    async def say(self, channel: int, user: dict[str, Any], text: str) -> dict[str, Any]:
        """`user` mentions the bot in `channel`; the message."""
        return await self.fake.dispatch_message(
            channel, user, f"{self.mention} {text}", mentions=[self.fake.bot_user]
        )

    async def start_shards(self) -> None:
        for shard in (0, 1):
            self.procs.start(f"shard{shard}", ["-m", "bot", "run"], SHARD_IDS=str(shard))
        await until(self.fake, self.procs, lambda: self.fake.connected == 2)

    async def start_workers(self, module: str = "bot", n: int = 2, **env: str) -> list[dict]:
        """Workers w1..wN as processes of `module`; their first heartbeats, once all have one."""
        for i in range(1, n + 1):
            args = ["-m", "bot", "worker", "--id"] if module == "bot" else ["-m", module]
            self.procs.start(f"worker{i}", [*args, f"w{i}"], **env)
        keys = [f"{self.prefix}:worker:w{i}" for i in range(1, n + 1)]
        client = connect(REDIS_URL)
        try:
            beats: list = []

            async def all_beat() -> bool:
                beats[:] = await client.mget(keys)
                return all(b is not None for b in beats)

            await until_async(self.procs, all_beat)
        finally:
            await client.aclose()
        return [json.loads(b) for b in beats]


@pytest.fixture
async def layout(pg: Database, prefix: str, two_versions, tmp_path: Path):
    async with FakeDiscord(n_channels=1) as fake:
        guilds = [fake.add_guild(f"g{i}", guild_on_shard(i % 2, 2, i)) for i in range(4)]
        channels = [fake.add_channel(f"c{i}", guilds[i // 2]) for i in range(8)]
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
            "PLACEHOLDER_AFTER_S": "0",  # its own tests: tests/bot_core, tests/e2e
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
            yield Layout(fake, procs, guilds, channels, prefix)
        finally:
            procs.stop_all()


async def test_two_shards_and_workers_answer_every_guild_once_and_survive_a_killed_worker(
    layout: Layout, pg: Database
):
    fake, procs, channels, prefix = layout.fake, layout.procs, layout.channels, layout.prefix
    alice = fake.add_user("alice")
    await layout.start_shards()
    await layout.start_workers()
    assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)]

    # every channel of every guild, two messages each, all at once
    mention = layout.mention
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
    await fake.dispatch_message(target, alice, f"{mention} tell me more", mentions=[fake.bot_user])
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


async def all_rows(db: Database, channel: int) -> list[Message]:
    """Every stored turn of a channel, in progress ones too, oldest first."""
    async with db.session() as s:
        query = select(Message).where(Message.channel_id == channel).order_by(Message.id)
        return list((await s.scalars(query)).all())


async def inbox(db: Database) -> list[Any]:
    async with db.session() as s:
        return await repo.pending_messages(s)


async def slash(layout: Layout, channel: int, name: str, options: list | None = None) -> str:
    """The owner (an admin) runs a slash command; the text of the bot's answer (for a deferred
    answer: its edited original response)."""
    fake = layout.fake
    interaction = await fake.dispatch_interaction(channel, fake.owner, name, options)
    callback = f"/interactions/{interaction['id']}/"
    hook = f"/webhooks/{fake.app_id}/{interaction['token']}/messages/@original"

    def answer() -> str | None:
        for r in fake.requests:
            if r.path.startswith(callback) and r.json.get("type") == 4:
                return r.json["data"]["content"]
            if r.method == "PATCH" and r.path == hook:
                return r.json["content"]
        return None

    return await until(fake, layout.procs, answer)


async def test_model_use_while_a_reply_streams_moves_both_shards_and_both_workers(
    layout: Layout, pg: Database, two_versions, redis_client
):
    """Requests are pinned to a version; a worker that gets one for a version it does not run
    loads it (its replies in flight finish on theirs). So the reply streaming during
    `/model use` ends complete on tiny@1, and every later mention, on either shard, is answered
    on tiny@2 by whichever worker takes it; neither worker goes back to tiny@1."""
    fake, procs, channels = layout.fake, layout.procs, layout.channels
    alice = fake.add_user("alice")
    hold = hold_key(layout.prefix)
    try:
        await layout.start_shards()
        # 2 slots each: with every reply held, 4 replies fill both workers
        beats = await layout.start_workers("tests.scaleout.gated_worker", ENGINE_SLOTS="2")
        assert [b["model"] for b in beats] == ["tiny@1", "tiny@1"]
        await redis_client.set(hold, "1")
        streaming = channels[0]  # shard 0
        await layout.say(streaming, alice, "a long story")
        await until(fake, procs, lambda: bot_messages(fake, streaming))  # shown, held

        text = await slash(
            layout,
            channels[2],  # shard 1: the other shard follows the pin
            "model",
            [
                {
                    "type": 1,
                    "name": "use",
                    "options": [{"type": 3, "name": "version", "value": "tiny@2"}],
                }
            ],
        )
        assert "Now running **tiny@2** (was tiny@1)" in text, text

        # three new mentions on both shards while the first reply is still held: they fill
        # the three free slots, so each worker takes at least one of them
        later = [channels[1], channels[3], channels[6]]
        assert {layout.shard_of(c) for c in later} == {0, 1}
        for channel in later:
            await layout.say(channel, alice, "and now?")
        await until(fake, procs, lambda: all(bot_messages(fake, c) for c in later))
        assert len(bot_messages(fake, streaming)) == 1
        await redis_client.delete(hold)

        # afterwards, once more on both shards
        again = [channels[0], channels[2]]
        assert {layout.shard_of(c) for c in again} == {0, 1}
        for channel in again:
            await layout.say(channel, alice, "still there?")

        async def complete(channel: int, n: int) -> bool:
            rows = await all_rows(pg, channel)
            return len(rows) == n and all(r.status == "complete" for r in rows)

        expected = {streaming: 4, channels[2]: 2, **{c: 2 for c in later}}
        for channel, n in expected.items():
            await until_async(procs, lambda c=channel, n=n: complete(c, n))
        versions = {}
        for channel in expected:
            rows = await all_rows(pg, channel)
            assert [r.role for r in rows] == ["user", "assistant"] * (len(rows) // 2)
            shown = bot_messages(fake, channel)
            assert len(shown) == len(rows) // 2  # one message per reply
            for row, message in zip(rows[1::2], shown, strict=True):
                assert same_text(message["content"], row.content)
            versions[channel] = [r.model_version for r in rows[1::2]]
        # the reply that streamed during the switch finished on the version it started on
        assert versions == {
            streaming: ["tiny@1", "tiny@2"],
            channels[2]: ["tiny@2"],
            **{c: ["tiny@2"] for c in later},
        }
        assert await inbox(pg) == []

        # both workers run tiny@2 now, as their heartbeats (and so /stats) say
        async def both_on_tiny2() -> bool:
            beats = await redis_client.mget([f"{layout.prefix}:worker:w{i}" for i in (1, 2)])
            return all(b is not None and json.loads(b)["model"] == "tiny@2" for b in beats)

        await until_async(procs, both_on_tiny2)
        text = await slash(layout, channels[1], "stats")
        assert "model: tiny@2 on cpu" in text and "workers: 2" in text, text
        for worker in ("w1", "w2"):
            assert re.search(rf"  {worker}: tiny@2 on cpu, \d of 2 slots busy", text), text
            log = (procs.logs / f"worker{worker[1]}.log").read_text(errors="replace")
            assert "loading tiny@2 (requested)" in log and "loading tiny@1" not in log
    finally:
        two_versions.use("tiny@1")  # the registry is shared by the session's tests


async def test_a_shard_killed_mid_reply_restarts_and_finishes_or_declines_what_it_accepted(
    layout: Layout, pg: Database, redis_client
):
    """kill -9 of the bot process of shard 1 while a reply streams and a second message of the
    channel waits in the inbox: restarted with the same SHARD_IDS, it ends the cut reply with
    the interrupted note on its Discord message (edited, not posted again) and answers the
    waiting message after it; shard 0's reply in flight meanwhile is left alone."""
    fake, procs, channels = layout.fake, layout.procs, layout.channels
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    hold = hold_key(layout.prefix)
    cut, other = channels[2], channels[0]
    assert (layout.shard_of(cut), layout.shard_of(other)) == (1, 0)
    await layout.start_shards()
    await layout.start_workers("tests.scaleout.gated_worker")
    await redis_client.set(hold, "1")
    first = await layout.say(cut, alice, "first")
    elsewhere = await layout.say(other, alice, "meanwhile")

    async def streaming(channel: int) -> bool:  # shown in Discord, and stored as shown
        rows = await all_rows(pg, channel)
        return len(rows) == 2 and rows[1].status == "in_progress" and rows[1].discord_message_ids

    for channel in (cut, other):
        await until_async(procs, lambda c=channel: streaming(c))
    waiting = await layout.say(cut, bob, "me next")
    await until_async(procs, lambda: _inbox_holds(pg, waiting["id"]))
    [partial] = bot_messages(fake, cut)
    assert (await all_rows(pg, cut))[1].discord_message_ids == [int(partial["id"])]

    procs.kill9("shard1")
    n_requests = len(fake.requests)
    procs.start("shard1", ["-m", "bot", "run"], SHARD_IDS="1")

    def edited() -> Any:
        return next(
            (
                r
                for r in fake.requests[n_requests:]
                if r.method == "PATCH" and r.path.endswith(f"/messages/{partial['id']}")
            ),
            None,
        )

    note = await until(fake, procs, edited)
    assert "interrupted: the bot restarted" in note.json["content"]
    assert (await all_rows(pg, other))[1].status == "in_progress"  # shard 0's, untouched
    await redis_client.delete(hold)

    async def settled() -> bool:
        rows = await all_rows(pg, cut)
        done = await all_rows(pg, other)
        return (
            len(rows) == 4
            and rows[3].status == "complete"
            and len(done) == 2
            and done[1].status == "complete"
        )

    await until_async(procs, settled)
    rows = await all_rows(pg, cut)
    assert [(r.role, r.status) for r in rows] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert [r.discord_message_ids[0] for r in rows[::2]] == [int(first["id"]), int(waiting["id"])]
    assert rows[1].finish_reason == "restart"
    shown = bot_messages(fake, cut)
    assert len(shown) == 2  # the cut reply's message was edited, not posted again
    assert shown[0]["id"] == partial["id"] and "interrupted" in shown[0]["content"]
    assert same_text(shown[0]["content"], rows[1].content)  # what it had shown, then the note
    assert str(shown[1]["message_reference"]["message_id"]) == waiting["id"]
    assert same_text(shown[1]["content"], rows[3].content)
    assert await inbox(pg) == []
    done = await all_rows(pg, other)
    [reply] = bot_messages(fake, other)
    assert str(reply["message_reference"]["message_id"]) == elsewhere["id"]
    assert "interrupted" not in reply["content"] and same_text(reply["content"], done[1].content)


async def _inbox_holds(db: Database, message_id: str) -> bool:
    return [p.discord_message_id for p in await inbox(db)] == [int(message_id)]
