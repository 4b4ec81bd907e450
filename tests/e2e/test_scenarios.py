"""End to end: the real ChatBot (discord.py, engine, database) against the local fake Discord."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.storage import repo
from bot.storage.db import Database
from bot.storage.models import AuditEntry
from tests.e2e.helpers import (
    Start,
    command,
    eventually,
    leave_in_inbox,
    option,
    pings_nobody,
    post_as_bot,
    reply_done,
    same_text,
    stop_while_held,
    stored,
)
from tests.engine.fakes import Gate, Runners
from tests.fakediscord import FakeDiscord


async def test_mention_gets_a_streamed_reply(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[0]
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> hello there", mentions=[fake.bot_user]
    )
    await reply_done(fake, bot, channel)
    posts = fake.find("POST", f"/channels/{channel}/messages")
    edits = fake.find("PATCH", f"/channels/{channel}/messages/")
    assert posts and edits, "expected a first message then edits while streaming"
    assert fake.requests.index(posts[0]) < fake.requests.index(edits[0])
    for request in posts + edits:
        assert pings_nobody(request.json["allowed_mentions"]), request
    first = posts[0].json
    assert str(first["message_reference"]["message_id"]) == fake.channel_messages(channel)[0]["id"]
    assert fake.find("POST", f"/channels/{channel}/typing")
    rows = await stored(bot, channel)
    assert [r.role for r in rows] == ["user", "assistant"]
    assert rows[0].content.endswith("hello there")
    final = fake.messages[int(rows[1].discord_message_id)]["content"]
    assert final == edits[-1].json["content"]
    assert final.strip() and final.strip() == rows[1].content.strip()


async def test_reply_chain_continues(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[1]
    await bot.chat.update_settings(channel, 1, max_tokens=8)  # short replies: history fits
    await fake.dispatch_message(channel, alice, f"<@{fake.bot_user['id']}> hi", [fake.bot_user])
    await reply_done(fake, bot, channel)
    answer = fake.channel_messages(channel)[1]
    assert answer["author"]["id"] == fake.bot_user["id"]
    await fake.dispatch_message(channel, alice, "and then?", reply_to=answer)  # no mention
    await reply_done(fake, bot, channel, n_before=1)
    rows = await stored(bot, channel)
    assert [r.role for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[2].content == "and then?"
    assert rows[3].prompt_tokens > rows[1].prompt_tokens  # the first exchange is in the prompt


async def test_dm_gets_an_answer(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    bob = fake.add_user("bob")
    dm = fake.add_dm(bob)
    await fake.dispatch_message(dm, bob, "hello in private")
    await reply_done(fake, bot, dm)
    rows = await stored(bot, dm)
    assert [r.role for r in rows] == ["user", "assistant"]
    assert rows[0].content == "hello in private"


async def test_plain_message_is_ignored(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[2]
    await fake.dispatch_message(channel, alice, "just talking among humans")
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> now you", [fake.bot_user]
    )
    await reply_done(fake, bot, channel)
    rows = await stored(bot, channel)
    assert [r.content for r in rows if r.role == "user"] == ["now you"]


async def test_settings_set_is_stored_and_changes_generation(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[3]
    sub = {"type": 1, "name": "set", "options": [option("max_tokens", 1, 4)]}
    _, callback = await command(fake, channel, alice, "settings", [sub])
    assert callback.json["type"] == 4
    assert "max_tokens" in callback.json["data"]["content"]
    assert (await bot.chat.get_settings(channel)).max_new_tokens == 1
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> talk a lot", [fake.bot_user]
    )
    await reply_done(fake, bot, channel)
    rows = await stored(bot, channel)
    assert rows[-1].role == "assistant" and rows[-1].token_count <= 1


async def test_ask_answers_in_its_own_response_and_keeps_no_history(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[4]
    prompt = {"type": 3, "name": "prompt", "value": "Say something nice."}
    interaction, callback = await command(fake, channel, alice, "ask", [prompt])
    assert callback.json["type"] == 5  # deferred ("thinking"), then answered by edits
    original = f"/webhooks/{fake.app_id}/{interaction['token']}/messages/@original"
    await fake.wait_for(lambda r: r.method == "PATCH" and r.path == original, 60)
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    edits = [r for r in fake.requests if r.method == "PATCH" and r.path == original]
    assert edits[-1].json["content"].strip()
    assert all(pings_nobody(r.json["allowed_mentions"]) for r in edits)
    answer = [m for m in fake.channel_messages(channel) if m["author"]["id"] == fake.bot_user["id"]]
    assert len(answer) == 1 and answer[0]["content"].strip()
    assert await stored(bot, channel) == []  # a one-off: nothing joins the channel's history


async def test_non_admin_is_refused_model_use(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    mallory = fake.add_user("mallory")
    channel = fake.text_channel_ids[4]
    running = bot.backend.model.ref
    sub = {"type": 1, "name": "use", "options": [option("version", "tiny@1", 3)]}
    _, callback = await command(fake, channel, mallory, "model", [sub])
    assert callback.json["type"] == 4
    assert "administrators only" in callback.json["data"]["content"]
    assert callback.json["data"]["flags"] & 64  # ephemeral
    assert bot.backend.model.ref == running


async def test_admin_model_use_takes_registry_names_only(
    fake: FakeDiscord, start_bot: Start, tiny_registry, tmp_path: Path
) -> None:
    """A version folder outside the registry (with a look-alike manifest) is never loaded from
    Discord, even by an admin; the audit log says it was refused."""
    bot = await start_bot()
    admin = fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[5]
    running = bot.backend.model.ref
    look_alike = tmp_path / "outside" / "v9"
    shutil.copytree(tiny_registry.active().path, look_alike)
    for ref in (str(look_alike), "../tiny/v1"):
        sub = {"type": 1, "name": "use", "options": [option("version", ref, 3)]}
        _, callback = await command(fake, channel, admin, "model", [sub])
        assert "give NAME or NAME@N" in callback.json["data"]["content"]
        assert bot.backend.model.ref == running
    async with bot.db.session() as s:
        assert (
            await s.scalars(select(AuditEntry))
        ).all() == []  # refused before anything was tried


async def test_forget_in_own_dm_needs_no_permission(fake: FakeDiscord, start_bot: Start) -> None:
    """In a DM the user owns the conversation: /forget works there; in a guild channel the same
    user still lacks Manage Messages."""
    bot = await start_bot()
    bob = fake.add_user("bob")
    dm = fake.add_dm(bob)
    await fake.dispatch_message(dm, bob, "hello there")
    await reply_done(fake, bot, dm)
    assert await stored(bot, dm)
    _, callback = await command(fake, dm, bob, "forget")
    assert "Forgot 2 turn(s)" in callback.json["data"]["content"]
    assert await stored(bot, dm) == []
    _, refused = await command(fake, fake.text_channel_ids[7], bob, "forget")
    assert "Manage Messages" in refused.json["data"]["content"]


async def test_twenty_channels_at_once(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    users = [fake.add_user(f"user{i}") for i in range(20)]
    channels = fake.text_channel_ids[:20]
    for channel in channels:
        await bot.chat.update_settings(channel, 1, max_tokens=4)
    await asyncio.gather(
        *(
            fake.dispatch_message(c, u, f"<@{fake.bot_user['id']}> hi {i}", [fake.bot_user])
            for i, (c, u) in enumerate(zip(channels, users, strict=True))
        )
    )
    await fake.wait_until(
        lambda: all(fake.find("POST", f"/channels/{c}/messages") for c in channels), 120
    )
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    for channel in channels:
        rows = await stored(bot, channel)
        assert [r.role for r in rows] == ["user", "assistant"], channel


async def test_history_survives_a_restart(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[5]
    await bot.chat.update_settings(channel, 1, max_tokens=8)  # short replies: history fits
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> remember me", [fake.bot_user]
    )
    await reply_done(fake, bot, channel)
    before = await stored(bot, channel)
    await start_bot.stop(bot)  # type: ignore[attr-defined]
    assert fake.connected == 0

    bot = await start_bot()
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> still there?", [fake.bot_user]
    )
    await reply_done(fake, bot, channel, n_before=1)
    after = await stored(bot, channel)
    assert (await bot.chat.get_settings(channel)).max_new_tokens == 8  # settings survive too
    assert [r.content for r in after[:2]] == [r.content for r in before]
    assert [r.role for r in after] == ["user", "assistant", "user", "assistant"]
    assert after[3].prompt_tokens > before[1].prompt_tokens  # earlier turns are in the prompt


async def test_shutdown_cuts_a_long_reply_and_says_so(
    fake: FakeDiscord, start_bot: Start, tmp_path: Path
) -> None:
    gate = Gate(after=4)  # the engine waits mid-reply until the shutdown has begun
    bot = await start_bot(runners=Runners(gate), shutdown_grace_s=0.0)
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[7]
    # seeded: the sampled reply to this prompt holds no end-of-turn token, so it can only end by
    # the cut (checked by letting the same reply run to the end: 128 tokens, finish "length")
    await bot.chat.update_settings(channel, 1, max_tokens=200, temperature=1.0, seed=7)
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> long one", [fake.bot_user]
    )
    await gate.wait()
    await fake.wait_for(lambda r: r.method == "POST" and r.path == f"/channels/{channel}/messages")
    assert bot.active_replies == 1, "the reply should still be streaming"

    await stop_while_held(start_bot, bot, gate)  # no grace: the reply is cut
    shown = fake.channel_messages(channel)[-1]["content"]
    assert shown.endswith("*(cut off: the bot is restarting)*")
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    try:
        async with db.session() as s:
            row = (await repo.history(s, channel, 10))[-1]
    finally:
        await db.close()
    assert (row.role, row.status, row.finish_reason) == ("assistant", "interrupted", "cancelled")
    posted = "".join(m["content"] for m in fake.channel_messages(channel))
    assert row.content.strip() and row.content.strip()[:40] in posted  # the partial text is kept


@pytest.fixture
def two_versions(tiny_registry, tmp_path: Path) -> Path:
    """A private registry copy holding tiny@1 (active) and tiny@2 (the same graph re-published)."""
    from export.registry import Registry

    root = tmp_path / "registry"
    shutil.copytree(tiny_registry.root, root)
    staged = tmp_path / "staged"
    shutil.copytree(tiny_registry.active().path, staged)
    Registry(root).publish(staged, tiny_registry.active().name)
    return root


async def test_admin_switches_version_while_a_reply_streams(
    fake: FakeDiscord, start_bot: Start, two_versions: Path
) -> None:
    gate = Gate(after=4)  # the engine waits mid-reply until the new version is in
    bot = await start_bot(runners=Runners(gate), model_registry=two_versions)
    first = bot.backend.model.ref
    name = first.split("@")[0]
    alice, admin = fake.add_user("alice"), fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[6]
    await bot.chat.update_settings(channel, 1, max_tokens=200, temperature=1.0, seed=7)
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> long one", [fake.bot_user]
    )
    await gate.wait()
    await fake.wait_for(lambda r: r.method == "POST" and r.path == f"/channels/{channel}/messages")
    assert bot.active_replies == 1, "the reply should still be streaming"

    sub = {"type": 1, "name": "use", "options": [option("version", f"{name}@2", 3)]}
    interaction = await fake.dispatch_interaction(channel, admin, "model", [sub])
    hook = f"/webhooks/{fake.app_id}/{interaction['token']}/messages/@original"
    done = await fake.wait_for(lambda r: r.method == "PATCH" and r.path == hook, 60)
    assert f"{name}@2" in done.json["content"]
    assert bot.backend.model.ref == f"{name}@2"
    assert bot.active_replies == 1  # swapped while the old version's reply was mid-way
    gate.open()

    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    n_before = len(fake.find("POST", f"/channels/{channel}/messages"))
    await fake.dispatch_message(channel, alice, f"<@{fake.bot_user['id']}> again", [fake.bot_user])
    await reply_done(fake, bot, channel, n_before=n_before)
    rows = [r for r in await stored(bot, channel) if r.role == "assistant"]
    assert [r.model_version for r in rows] == [first, f"{name}@2"]
    assert rows[0].status != "interrupted"


async def test_everyone_in_bot_output_pings_nobody(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    admin, alice = fake.add_user("admin", admin=True), fake.add_user("alice")
    channel = fake.text_channel_ids[7]
    # short replies leave the tiny model's small context room for this persona's tokens
    await bot.chat.update_settings(channel, 1, max_tokens=32)
    persona = f"@everyone @here <@{alice['id']}> <@&{fake.admin_role_id}> listen"
    # room for the persona in the tiny model's context, whatever the ids' digits
    await bot.chat.update_settings(channel, 1, max_tokens=16)
    sub = {"type": 1, "name": "set", "options": [option("text", persona, 3)]}
    await fake.dispatch_interaction(channel, admin, "persona", [sub])
    assert await fake.wait_until(lambda: fake.find("POST", "/callback"), 30)
    assert await bot.chat.get_persona(channel) == persona
    shown = await fake.dispatch_interaction(
        channel, alice, "persona", [{"type": 1, "name": "show"}]
    )
    callback = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{shown['id']}/"))
    assert persona in callback.json["data"]["content"]  # the output holds the mentions...
    await fake.dispatch_message(
        channel, alice, f"<@{fake.bot_user['id']}> @everyone", [fake.bot_user]
    )
    await reply_done(fake, bot, channel)
    assert fake.pings == []  # ...and nobody is notified


async def test_stats_shows_queue_depth_and_streams(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    admin = fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[8]
    _, callback = await command(fake, channel, admin, "stats")
    lines = callback.json["data"]["content"].strip("`\n").splitlines()
    assert f"model: {bot.backend.model.ref} on cpu" in lines
    assert "queue: 0 waiting" in lines
    assert "streams: 0 of 4 slots busy" in lines  # engine_slots=4, nothing running
    assert callback.json["data"]["flags"] & 64  # ephemeral


async def test_after_a_crash_the_bot_finishes_what_it_had_accepted(
    fake: FakeDiscord, start_bot: Start
) -> None:
    """What a kill -9 leaves: a reply cut mid-stream (its row in progress) and messages accepted
    but never answered (in the inbox). On restart the cut reply's Discord message says it was
    interrupted, a recent unanswered message is answered, an old one is declined with a note."""
    from datetime import timedelta

    from sqlalchemy import update

    from bot.storage.models import Message, Status

    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[8]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    await fake.dispatch_message(channel, alice, f"<@{fake.bot_user['id']}> first", [fake.bot_user])
    await reply_done(fake, bot, channel)
    recent = await fake.dispatch_message(channel, alice, "said while the bot was down")
    old = await fake.dispatch_message(channel, alice, "said long ago")
    await start_bot.stop(bot)  # type: ignore[attr-defined]

    db = await Database.open(bot.settings.database_url)
    async with db.session() as s, s.begin():  # the state a kill -9 mid-reply leaves
        cut = (await repo.history(s, channel, 10))[-1]
        await s.execute(
            update(Message).where(Message.id == cut.id).values(status=Status.IN_PROGRESS)
        )
        await leave_in_inbox(s, alice, recent)
        await leave_in_inbox(s, alice, old, age=timedelta(hours=2))
    await db.close()
    cut_message = cut.discord_message_ids[-1]
    stop = {"type": 2, "style": 4, "label": "Stop", "custom_id": f"reply:stop:{cut.id}"}
    fake.messages[cut_message]["components"] = [{"type": 1, "components": [stop]}]  # mid-stream
    n_before = len(fake.find("POST", f"/channels/{channel}/messages"))
    n_requests = len(fake.requests)

    bot = await start_bot()
    edited = await fake.wait_until(
        lambda: next(
            (
                r
                for r in fake.requests[n_requests:]
                if r.method == "PATCH" and r.path.endswith(f"/messages/{cut_message}")
            ),
            None,
        ),
        60,
    )
    assert "interrupted: the bot restarted" in edited.json["content"]
    # its Stop is gone (the reply no longer streams): Regenerate, as under a finished reply
    shown = [c["custom_id"] for row in edited.json["components"] for c in row["components"]]
    assert shown == [f"reply:regen:{cut.id}"]
    await fake.wait_until(
        lambda: len(fake.find("POST", f"/channels/{channel}/messages")) >= n_before + 2, 60
    )
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    posts = fake.find("POST", f"/channels/{channel}/messages")[n_before:]
    by_target = {str(p.json["message_reference"]["message_id"]): p.json for p in posts}
    assert "please ask again" in by_target[old["id"]]["content"]
    assert "please ask again" not in by_target[recent["id"]]["content"]  # a real answer
    assert await bot.chat.pending() == []
    rows = await stored(bot, channel)
    assert [(r.role, r.status) for r in rows] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert rows[1].finish_reason == "restart" and rows[2].content == recent["content"]


async def test_after_a_crash_an_answer_replaces_the_placeholder_it_had_shown(
    fake: FakeDiscord, start_bot: Start
) -> None:
    """A message that waited behind another reply showed the "in line" placeholder, then the
    bot was killed. On restart its answer is written into that placeholder (no second message),
    and a declined one's placeholder is deleted before the note."""
    from datetime import timedelta

    from bot.cogs.chat import IN_LINE

    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[7]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    recent = await fake.dispatch_message(channel, alice, "said while the bot was down")
    old = await fake.dispatch_message(channel, alice, "said long ago")
    await start_bot.stop(bot)  # type: ignore[attr-defined]
    # the placeholders the bot had posted for them
    kept = int((await post_as_bot(fake, recent, IN_LINE))["id"])
    dropped = int((await post_as_bot(fake, old, IN_LINE))["id"])
    db = await Database.open(bot.settings.database_url)
    async with db.session() as s, s.begin():  # the inbox a kill -9 leaves
        await leave_in_inbox(s, alice, recent, held_id=kept)
        await leave_in_inbox(s, alice, old, age=timedelta(hours=2), held_id=dropped)
    await db.close()
    n_posts = len(fake.find("POST", f"/channels/{channel}/messages"))

    bot = await start_bot()
    await fake.wait_until(lambda: fake.find("DELETE", f"/messages/{dropped}"), 60)
    posted = fake.find
    await fake.wait_until(
        lambda: len(posted("POST", f"/channels/{channel}/messages")) > n_posts, 60
    )
    await fake.wait_until(lambda: fake.messages[kept]["content"] != IN_LINE, 60)
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    posts = fake.find("POST", f"/channels/{channel}/messages")[n_posts:]
    assert len(posts) == 1 and "please ask again" in posts[0].json["content"]  # the old one
    assert str(posts[0].json["message_reference"]["message_id"]) == old["id"]
    answer = fake.messages[kept]["content"]  # written over
    rows = await stored(bot, channel)
    assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "complete")]
    assert same_text(answer, rows[1].content)
    assert rows[1].discord_message_ids == [kept] and dropped not in fake.messages
    assert await bot.chat.pending() == []


async def test_one_message_that_cannot_be_recovered_does_not_stop_the_others(
    fake: FakeDiscord, start_bot: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery after a restart went message by message in one loop, so the first message
    discord.py could not read (here a placeholder whose reference lacks its channel, a KeyError
    inside fetch_message) ended it: every later message stayed unanswered."""
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[6]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    odd = await fake.dispatch_message(channel, alice, "first")
    fine = await fake.dispatch_message(channel, alice, "second")
    await start_bot.stop(bot)  # type: ignore[attr-defined]
    broken = await post_as_bot(fake, odd, "...", with_channel=False)
    db = await Database.open(bot.settings.database_url)
    async with db.session() as s, s.begin():
        await leave_in_inbox(s, alice, odd, held_id=int(broken["id"]))
        await leave_in_inbox(s, alice, fine)
    await db.close()

    bot = await start_bot()
    answered = await fake.wait_for(
        lambda r: (
            r.method == "POST"
            and str((r.json or {}).get("message_reference", {}).get("message_id")) == fine["id"]
        ),
        60,
    )
    assert "please ask again" not in answered.json["content"]
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    assert "cannot recover message" in caplog.text


async def test_shutdown_tells_waiting_and_late_mentions_to_ask_again(
    fake: FakeDiscord, start_bot: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A mention waiting behind a streaming reply when the bot shuts down, and one that arrives
    during the grace period, both get the short restarting note; nothing is logged at ERROR and
    nothing is left in the inbox."""
    gate = Gate(after=4)  # alice's reply streams until the shutdown has begun
    bot = await start_bot(runners=Runners(gate), shutdown_grace_s=0.0)
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    channel, other = fake.text_channel_ids[9], fake.text_channel_ids[10]
    await bot.chat.update_settings(channel, 1, max_tokens=200, temperature=1.0, seed=7)
    mention = f"<@{fake.bot_user['id']}>"
    await fake.dispatch_message(channel, alice, f"{mention} long one", [fake.bot_user])
    await gate.wait()
    await fake.wait_for(lambda r: r.method == "POST" and r.path == f"/channels/{channel}/messages")
    waiting = await fake.dispatch_message(channel, bob, f"{mention} me next", [fake.bot_user])
    assert [p.content for p in await eventually(bot.chat.pending)] == ["me next"]

    bot.accepting = False  # the grace period has begun
    late = await fake.dispatch_message(other, carol, f"{mention} hello?", [fake.bot_user])
    note_to_late = await fake.wait_for(
        lambda r: (
            r.method == "POST"
            and r.path == f"/channels/{other}/messages"
            and str(r.json["message_reference"]["message_id"]) == late["id"]
        ),
        30,
    )
    assert "restarting" in note_to_late.json["content"]
    bot.accepting = True

    caplog.clear()
    await stop_while_held(start_bot, bot, gate)
    replies = [
        r.json
        for r in fake.find("POST", f"/channels/{channel}/messages")
        if str((r.json.get("message_reference") or {}).get("message_id")) == waiting["id"]
    ]
    assert [r["content"] for r in replies] == ["I'm restarting; please ask again in a moment."]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    db = await Database.open(bot.settings.database_url)
    try:
        async with db.session() as s:
            assert await repo.pending_messages(s) == []
    finally:
        await db.close()


async def test_leaving_async_with_waits_for_the_whole_shutdown(bot_config) -> None:
    """What SIGTERM does in `serve`: close() from a signal handler while `async with bot:`
    waits in start(). Leaving the block must not end before the database is closed, or
    asyncio.run cancels that close (an ERROR in the log on every shutdown)."""
    from bot.client import create_bot

    bot = await create_bot(bot_config())
    async with bot:
        task = asyncio.create_task(bot.start("fake-token"))
        await asyncio.wait_for(bot.wait_until_ready(), 60)
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(bot.close()))
        await asyncio.wait_for(task, 60)
    assert bot.shut_down


async def test_model_info_shows_the_quality_gate(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    admin = fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[8]
    sub = {"type": 1, "name": "info"}
    _, callback = await command(fake, channel, admin, "model", [sub])
    lines = callback.json["data"]["content"].strip("`\n").splitlines()
    gate = bot.backend.model.manifest.gate
    assert gate is not None and gate.summary() in lines
    # the tiny fp32 model is its own reference, and knows no capital
    assert f"{gate.prompts}/{gate.prompts} greedy answers equal fp32's" in gate.summary()
    assert "example WRONG" in gate.summary()


async def test_admin_model_use_with_bad_references_gets_a_short_answer(
    fake: FakeDiscord, start_bot: Start
) -> None:
    """Superscript digits (isdigit() is true), a number past Python's int-parsing limit, a name
    of 5,000 letters: each a one-line refusal that fits a Discord message, never the apology."""
    bot = await start_bot()
    admin = fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[5]
    running = bot.backend.model.ref
    for ref in ("tiny@²", "tiny@" + "9" * 5000, "a" * 5000):
        sub = {"type": 1, "name": "use", "options": [option("version", ref, 3)]}
        _, callback = await command(fake, channel, admin, "model", [sub])
        content = callback.json["data"]["content"]
        assert "give NAME or NAME@N" in content and "Sorry" not in content
        assert len(content) < 400
        assert bot.backend.model.ref == running
