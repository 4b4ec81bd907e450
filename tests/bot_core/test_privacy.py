"""Privacy: opted-out users are answered and stored nowhere, forget-me, export, retention, and
the training export that `models finetune` reads."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from bot.access import Effect, Kind
from bot.dialogues import guild_dialogues, write_jsonl
from bot.errors import WithdrawnError
from bot.privacy import PrivacyService, replies_to
from bot.service import ChatService
from bot.storage import repo
from bot.storage.db import Database
from bot.storage.models import AuditEntry, Editors, Message, PendingMessage, Role
from bot.turns import IncomingMessage, Speaker
from tests.bot_core.fakes import FakeEngine, first_answering_second_waiting

ROOT = Path(__file__).resolve().parents[2]
BOT = Speaker(900, "Bot", is_bot=True)
ALICE = Speaker(1, "alice")
BOB = Speaker(2, "bob")
GUILD, OTHER_GUILD = 5, 6
GENERAL, RANDOM, ELSEWHERE, DM = 10, 11, 12, 13


def message(text: str, channel: int = GENERAL, author: Speaker = ALICE) -> IncomingMessage:
    guild = {GENERAL: GUILD, RANDOM: GUILD, ELSEWHERE: OTHER_GUILD}.get(channel)
    return IncomingMessage(channel, guild, author, text)


async def converse(service: ChatService, msg: IncomingMessage) -> str:
    async with service.reply(msg, bot=BOT) as reply:
        return "".join([piece async for piece in reply])


async def rows(db: Database) -> list[Message]:
    async with db.session() as s:
        return list((await s.scalars(select(Message).order_by(Message.id))).all())


async def test_an_opted_out_user_is_answered_from_the_live_message_and_nothing_is_stored(
    service: ChatService, engine, monkeypatch
):
    await converse(service, message("remember: my cat is Tom", author=BOB))
    await service.set_persona(GENERAL, "You are a pirate.", actor_id=BOB.id)
    await service.privacy.set_opted_out(ALICE.id, True)
    inbox_writes = []
    original = repo.add_pending

    async def spy(s, **fields):
        inbox_writes.append(fields)
        return await original(s, **fields)

    monkeypatch.setattr(repo, "add_pending", spy)
    answer = await converse(service, message("a secret of mine"))
    assert answer == engine.reply_text
    prompt = engine.prompt_text(-1)
    assert "a secret of mine" in prompt and "You are a pirate." in prompt
    assert "my cat is Tom" not in prompt  # the live message alone, no history
    assert inbox_writes == []
    stored = await rows(service.db)
    assert [r.content for r in stored if "secret" in r.content] == []
    assert len(stored) == 2  # bob's exchange only; nothing of alice's exchange
    await service.privacy.set_opted_out(ALICE.id, False)
    await converse(service, message("hello again"))
    assert [r.author_id for r in await rows(service.db)][-2:] == [ALICE.id, BOT.id]
    assert await PrivacyService(service.db).opted_out(ALICE.id) is False


async def test_opting_out_while_a_message_waits_takes_it_out_of_the_inbox(
    service: ChatService, engine
):
    pending_id = await service.accept(message("sent before opting out"))
    await service.privacy.set_opted_out(ALICE.id, True)
    async with service.reply(
        message("sent before opting out"), bot=BOT, pending_id=pending_id
    ) as r:
        assert "".join([piece async for piece in r]) == engine.reply_text
    assert await service.pending() == [] and await rows(service.db) == []


def test_replies_follow_the_turn_they_answer():
    outline = [
        (1, 10, "user", 1),
        (2, 10, "assistant", 900),
        (3, 10, "user", 2),
        (4, 10, "assistant", 900),
        (5, 10, "user", 1),
        (6, 11, "assistant", 900),  # another channel: not a reply to 5
        (7, 11, "user", 1),
        (8, 11, "assistant", 900),
    ]
    assert replies_to(outline, 1) == {2, 8}
    assert replies_to(outline, 2) == {4}


async def test_forget_me_deletes_the_user_their_replies_and_their_dms_only_in_scope(
    service: ChatService,
):
    await converse(service, message("alice in general"))
    await converse(service, message("bob in general", author=BOB))
    await converse(service, message("alice in random", channel=RANDOM))
    await converse(service, message("alice elsewhere", channel=ELSEWHERE))
    await converse(service, message("alice in a dm", channel=DM))
    await converse(service, message("bob in his dm", channel=14, author=BOB))
    await service.accept(message("alice waiting"))  # in the inbox, not yet answered
    before = await rows(service.db)
    assert len(before) == 12
    done = await service.privacy.forget_me(ALICE.id, GUILD)
    assert (done.turns, done.replies, done.pending) == (3, 3, 1)
    left = await rows(service.db)
    assert [(r.channel_id, r.author_id) for r in left] == [
        (GENERAL, BOB.id),
        (GENERAL, BOT.id),
        (ELSEWHERE, ALICE.id),  # another server: out of scope
        (ELSEWHERE, BOT.id),
        (14, BOB.id),
        (14, BOT.id),
    ]
    assert await service.pending() == []
    async with service.db.session() as s:
        entry = (await s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()))).first()
    assert entry.action == "privacy.forget-me" and "alice" not in entry.detail
    # the conversation goes on with what is left
    await converse(service, message("bob again", author=BOB))
    assert "alice in general" not in service.backend.prompt_text(-1)


async def test_export_holds_the_users_data_in_scope(service: ChatService):
    await converse(service, message("mine"))
    await converse(service, message("bob's", author=BOB))
    await converse(service, message("in a dm", channel=DM))
    await converse(service, message("elsewhere", channel=ELSEWHERE))
    await service.privacy.set_opted_out(ALICE.id, True)
    data = await service.privacy.export(ALICE.id, GUILD)
    json.dumps(data)  # JSON-ready
    assert data["user_id"] == str(ALICE.id) and data["opted_out"] is True
    assert [m["content"] for m in data["messages"]] == ["mine", "in a dm"]
    assert {m["channel_id"] for m in data["messages"]} == {str(GENERAL), str(DM)}


async def test_retention_deletes_old_rows_in_batches(service: ChatService):
    for i in range(5):
        await converse(service, message(f"turn {i}"))
    now = datetime.now(UTC)
    async with service.db.session() as s, s.begin():
        ids = [r.id for r in await repo.history(s, GENERAL, 100)]
        old = now - timedelta(days=40)
        await s.execute(update(Message).where(Message.id.in_(ids[:7])).values(created_at=old))
        await repo.ensure_channel(s, GENERAL, GUILD)
        s.add(PendingMessage(channel_id=GENERAL, author_id=1, content="stale", received_at=old))
    privacy = service.privacy
    assert await privacy.purge_expired(0, now=now) == 0  # 0: keep
    assert await privacy.purge_expired(60, now=now) == 0  # nothing that old
    assert await privacy.purge_expired(30, now=now, batch=3) == 7
    left = await rows(service.db)
    assert [r.id for r in left] == ids[7:]
    assert await service.pending() == []


async def stored_conversations(service: ChatService) -> None:
    await service.set_persona(GENERAL, "You are kind.", actor_id=BOB.id)
    await converse(service, message("hello, I am alice"))
    await converse(service, message("bob here", author=BOB))
    await converse(service, message("private opinions", author=Speaker(3, "carol")))
    await converse(service, message("in random", channel=RANDOM))
    await converse(service, message("not this server", channel=ELSEWHERE))
    await service.forget(RANDOM, actor_id=BOB.id)
    await converse(service, message("after forget", channel=RANDOM))
    await service.privacy.set_opted_out(3, True)
    async with service.db.session() as s, s.begin():  # carol's turns from before she opted out
        await repo.add_message(
            s,
            channel_id=GENERAL,
            author_id=3,
            author_name="carol",
            role=Role.USER,
            content="carol before",
        )
        await repo.add_message(
            s,
            channel_id=GENERAL,
            author_id=BOT.id,
            author_name="Bot",
            role=Role.ASSISTANT,
            content="reply to carol",
        )


async def test_dialogues_leave_out_opted_out_users_forgotten_turns_and_other_servers(
    service: ChatService,
):
    await stored_conversations(service)
    excluded = await service.privacy.opted_out_users()
    found = await guild_dialogues(service.db, GUILD, excluded, max_exchanges=8)
    text = json.dumps(found)
    assert "carol" not in text and "private opinions" not in text
    assert "in random" not in text and "not this server" not in text
    general, random = found
    assert general[0] == {"role": "system", "content": "You are kind."}
    assert [m["role"] for m in general[1:]] == ["user", "assistant"] * 2
    assert general[1]["content"] == "alice: hello, I am alice"  # named: two users talk
    assert random == [
        {"role": "user", "content": "after forget"},
        {"role": "assistant", "content": service.backend.reply_text},
    ]
    chunks = await guild_dialogues(service.db, GUILD, excluded, max_exchanges=1)
    assert len(chunks) == 3


def run_bot(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_export_dialogues_cli_writes_what_finetune_reads(
    service: ChatService, db_url: str, tmp_path: Path, tiny_llama_dir: Path
):
    await stored_conversations(service)
    env = {**os.environ, "DATABASE_URL": db_url, "DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out" / "dialogues.jsonl"
    args = ("db", "export-dialogues", "--guild", str(GUILD))
    done = run_bot(*args, "--out", str(out), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 2 conversation(s) of guild {GUILD} to {out}"
    assert [p.name for p in out.parent.iterdir()] == ["dialogues.jsonl"]  # no temporary left
    none = run_bot(*args[:-1], "999", "--out", str(tmp_path / "x.jsonl"), env=env, cwd=tmp_path)
    assert (
        none.returncode == 2
        and none.stderr == "error: guild 999: no stored conversations to export\n"
    )
    assert not (tmp_path / "x.jsonl").exists()

    from models.data import encode_items, load_dataset
    from models.tokenizer import TokenizerBundle

    dataset = load_dataset(str(out))  # what `python -m models finetune --data FILE` loads
    assert dataset.is_dialogue and len(dataset.items) == 2
    examples = encode_items(
        TokenizerBundle.from_hf_folder(tiny_llama_dir), dataset.items, 256, dialogue=True
    )
    assert len(examples) == 2
    assert all(any(label != -100 for label in e.labels) for e in examples)


def test_write_jsonl_is_atomic(tmp_path: Path, monkeypatch):
    out = tmp_path / "d.jsonl"
    write_jsonl(out, [[{"role": "user", "content": "old"}]])

    class Boom:
        pass

    try:
        write_jsonl(out, [[{"role": "user", "content": Boom()}]])  # not JSON: fails midway
    except TypeError:
        pass
    else:
        raise AssertionError("expected a TypeError")
    assert json.loads(out.read_text())["messages"][0]["content"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


async def test_two_processes_on_one_database_see_each_others_changes_at_once(
    db: Database, settings
):
    """Two shard processes share one database: an opt-out, an access list entry, the editors,
    server defaults and auto-reply changed through one apply to the next message in the other
    (no per-process cache to wait out until a restart)."""
    one, two = ChatService(db, FakeEngine(), settings), ChatService(db, FakeEngine(), settings)
    # each reads once first: a cache, if there were one, would now hold the old state
    assert not await two.privacy.opted_out(ALICE.id)
    assert await two.access.allows(GUILD, channel_ids=[GENERAL], user_id=BOB.id)
    assert (await two.access.editing(GUILD)).settings == Editors.EVERYONE
    assert not await two.is_autoreply(GENERAL) and not await two.replies_in_threads(RANDOM)
    assert (await two.get_settings(GENERAL, GUILD)).top_k != 3

    await one.privacy.set_opted_out(ALICE.id, True)
    await one.access.set_rule(GUILD, Kind.USER, BOB.id, Effect.DENY, actor_id=ALICE.id)
    await one.access.set_editing(GUILD, ALICE.id, settings=Editors.MANAGERS)
    await one.set_autoreply(GENERAL, True, ALICE.id)
    await one.set_autoreply(RANDOM, True, ALICE.id, threads=True)
    await one.update_server_settings(GUILD, ALICE.id, top_k=3)

    assert await two.privacy.opted_out(ALICE.id)
    assert not await two.access.allows(GUILD, channel_ids=[GENERAL], user_id=BOB.id)
    assert (await two.access.editing(GUILD)).settings == Editors.MANAGERS
    assert await two.is_autoreply(GENERAL) and await two.replies_in_threads(RANDOM)
    assert (await two.get_settings(GENERAL, GUILD)).top_k == 3
    await converse(two, message("not to be kept"))  # alice opted out through the other one
    assert await rows(db) == []

    await one.privacy.set_opted_out(ALICE.id, False)
    await one.access.clear(GUILD, ALICE.id)
    await one.set_autoreply(GENERAL, False, ALICE.id)
    assert not await two.privacy.opted_out(ALICE.id)
    assert await two.access.allows(GUILD, channel_ids=[GENERAL], user_id=BOB.id)
    assert not await two.is_autoreply(GENERAL)


async def test_a_message_forgotten_while_it_waits_is_neither_answered_nor_stored(
    db: Database, settings
):
    """Forget-me deletes the inbox row of a message waiting behind another reply: when its turn
    comes it is withdrawn (WithdrawnError, nothing generated or stored), and forget-me hands
    back its "in line" placeholder, which no answer or restart would replace."""
    engine = FakeEngine(gate=asyncio.Event())
    service = ChatService(db, engine, settings)
    first = asyncio.create_task(converse(service, message("you first", author=BOB)))
    waiting = service.reply(message("my secret"), bot=BOT)
    entering = asyncio.create_task(waiting.__aenter__())
    await first_answering_second_waiting(service, engine)
    await waiting.hold(777)  # the placeholder shown for it
    done = await service.privacy.forget_me(ALICE.id, GUILD)
    assert done.pending == 1 and done.placeholders == ((GENERAL, 777),)
    assert engine.gate is not None
    engine.gate.set()
    await first
    with pytest.raises(WithdrawnError):
        await entering
    assert len(engine.submitted) == 1  # bob's reply only
    assert all("secret" not in r.content for r in await rows(db))
    assert await service.pending() == []
    assert (await service.privacy.export(ALICE.id, GUILD))["messages"] == []
