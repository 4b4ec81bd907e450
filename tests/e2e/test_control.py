"""End to end: access lists, other bots, who may change settings and personas, server defaults,
and the /privacy commands, through the fake Discord."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from bot.storage import repo
from bot.storage.models import Message, PendingMessage, Role
from tests.e2e.helpers import Start, command, eventually, option, reply_done, stored
from tests.engine.fakes import Gate, Runners
from tests.fakediscord import FakeDiscord
from tests.fakediscord.server import button_ids

MANAGE_MESSAGES = 1 << 13
USER, CHANNEL, ROLE = 6, 7, 8

CONFIRM = "cannot be undone"  # in the forget-me confirmation (reply buttons have components too)


def sub(name: str, *options: dict) -> dict:
    return {"type": 1, "name": name, "options": list(options)}


async def everything_stored(bot) -> list[tuple[int, str]]:
    """(channel, content) of every message row and inbox row."""
    async with bot.db.session() as s:
        rows = (await s.scalars(select(Message))).all()
        waiting = (await s.scalars(select(PendingMessage))).all()
    return [(r.channel_id, r.content) for r in rows] + [(p.channel_id, p.content) for p in waiting]


async def mention(fake: FakeDiscord, channel: int, user: dict, text: str) -> dict:
    return await fake.dispatch_message(
        channel, user, f"<@{fake.bot_user['id']}> {text}", [fake.bot_user]
    )


def bot_posts(fake: FakeDiscord, channel: int) -> int:
    return len(fake.find("POST", f"/channels/{channel}/messages"))


async def test_access_lists_decide_who_is_answered_where(fake: FakeDiscord, start_bot: Start):
    muted = fake.add_role("muted")
    admin = fake.add_user("admin", admin=True)
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    general, other = fake.text_channel_ids[:2]
    bot = await start_bot()

    # a member without Manage Messages cannot change the lists
    _, refused = await command(
        fake, general, bob, "access", [sub("deny", option("user", bob["id"], USER))]
    )
    assert "Manage Messages" in refused.json["data"]["content"]
    assert await bot.chat.access.allows(
        fake.guild_id, channel_ids=[general], user_id=int(bob["id"])
    )

    _, done = await command(
        fake, general, admin, "access", [sub("deny", option("user", bob["id"], USER))]
    )
    assert (
        done.json["data"]["flags"] & 64
        and f"<@{bob['id']}>: denied" in done.json["data"]["content"]
    )
    prompt = {"type": 3, "name": "prompt", "value": "and by /ask?"}
    _, asked = await command(fake, general, bob, "ask", [prompt])
    assert "access lists don't let you" in asked.json["data"]["content"]
    await mention(fake, general, bob, "am I heard?")  # denied: ignored, nothing stored
    await mention(fake, general, alice, "and me?")
    await reply_done(fake, bot, general)
    assert "am I heard?" not in [c for _, c in await everything_stored(bot)]
    assert [r.content for r in await stored(bot, general) if r.role == "user"] == ["and me?"]

    # an allowed channel is then required
    await command(
        fake, general, admin, "access", [sub("allow", option("channel", str(general), CHANNEL))]
    )
    n = bot_posts(fake, other)
    await mention(fake, other, alice, "over here")
    await mention(fake, general, alice, "still here")
    await reply_done(fake, bot, general, n_before=1)
    assert bot_posts(fake, other) == n and await stored(bot, other) == []

    # a denied role, given to alice
    fake.give_role(alice, muted)
    await command(fake, general, admin, "access", [sub("deny", option("role", str(muted), ROLE))])
    _, shown = await command(fake, general, admin, "access", [sub("show")])
    text = shown.json["data"]["content"]
    assert f"deny roles: <@&{muted}>" in text and f"allow channels: <#{general}>" in text
    before = len(await stored(bot, general))
    await mention(fake, general, alice, "muted now")
    await command(fake, general, admin, "access", [sub("clear")])  # then everyone again
    await mention(fake, general, bob, "free again")
    await reply_done(fake, bot, general, n_before=2)
    contents = [r.content for r in (await stored(bot, general))[before:]]
    assert contents[0] == "free again" and "muted now" not in contents


async def test_other_bots_are_ignored_unless_allowed(fake: FakeDiscord, start_bot: Start):
    other_bot = fake.make_user("otherbot", bot=True)
    fake.add_member(other_bot)
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[2]
    bot = await start_bot()
    await mention(fake, channel, other_bot, "beep")
    await mention(fake, channel, alice, "hello")
    await reply_done(fake, bot, channel)
    assert [r.content for r in await stored(bot, channel) if r.role == "user"] == ["hello"]
    await start_bot.stop(bot)

    bot = await start_bot(reply_to_bots=True)
    n = bot_posts(fake, channel)
    await mention(fake, channel, other_bot, "beep again")
    await reply_done(fake, bot, channel, n_before=n)
    assert [r.content for r in await stored(bot, channel) if r.role == "user"][-1] == "beep again"


async def test_editors_and_server_defaults(fake: FakeDiscord, start_bot: Start):
    mods = fake.add_role("mods", MANAGE_MESSAGES)
    mod, bob = fake.add_user("mod"), fake.add_user("bob")
    fake.give_role(mod, mods)
    general, other = fake.text_channel_ids[3:5]
    bot = await start_bot()
    persona = [sub("set", option("text", "You are terse.", 3))]

    # defaults: everyone changes settings, managers personas
    _, refused = await command(fake, general, bob, "persona", persona)
    assert "Manage Messages" in refused.json["data"]["content"]
    assert await bot.chat.get_persona(general) is None
    _, ok = await command(fake, general, bob, "settings", [sub("set", option("top_k", 7, 4))])
    assert ok.json["data"]["content"].startswith("Settings updated")

    # a manager opens personas to everyone and closes settings to managers
    editors = sub("editors", option("settings", "managers", 3), option("persona", "everyone", 3))
    _, changed = await command(fake, general, mod, "access", [editors])
    assert (
        "Settings may be changed by: managers; personas by: everyone"
        in changed.json["data"]["content"]
    )
    await command(fake, general, bob, "persona", persona)
    assert await bot.chat.get_persona(general) == "You are terse."
    _, refused = await command(fake, general, bob, "settings", [sub("set", option("top_k", 9, 4))])
    assert "Manage Messages" in refused.json["data"]["content"]
    _, refused = await command(fake, general, bob, "settings", [sub("reset")])
    assert "Manage Messages" in refused.json["data"]["content"]
    assert (await bot.chat.get_settings(general)).top_k == 7

    # server defaults: managers only; a channel's own values win
    server = sub(
        "set", option("scope", "server", 3), option("temperature", 0.25, 10), option("top_k", 3, 4)
    )
    _, done = await command(fake, other, mod, "settings", [server])
    assert done.json["data"]["content"].startswith("Server defaults updated")
    here = await bot.chat.get_settings(general)
    there = await bot.chat.get_settings(other, fake.guild_id)  # a channel not yet stored
    assert (here.temperature, here.top_k) == (0.25, 7)
    assert (there.temperature, there.top_k) == (0.25, 3)
    _, shown = await command(fake, other, bob, "settings", [sub("show")])
    assert "temperature = 0.25 (server default)" in shown.json["data"]["content"]
    await fake.dispatch_message(other, bob, f"<@{fake.bot_user['id']}> hi", [fake.bot_user])
    await reply_done(fake, bot, other)
    assert (await stored(bot, other))[-1].role == "assistant"


async def test_forget_me_asks_first_and_only_the_asker_can_confirm(
    fake: FakeDiscord, start_bot: Start
):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    general = fake.text_channel_ids[5]
    dm = fake.add_dm(alice)
    bot = await start_bot()
    await mention(fake, general, alice, "alice's secret")
    await reply_done(fake, bot, general)
    await mention(fake, general, bob, "bob's turn")
    await reply_done(fake, bot, general, n_before=1)
    await fake.dispatch_message(dm, alice, "a private word")
    await reply_done(fake, bot, dm)

    _, asked = await command(fake, general, alice, "privacy", [sub("forget-me")])
    first = next(m for m in fake.channel_messages(general) if CONFIRM in m["content"])
    interaction = await fake.dispatch_component(first, alice, button_ids(first)[1])  # cancel
    await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"))
    assert fake.messages[int(first["id"])]["content"] == "Nothing was deleted."
    assert len(await stored(bot, general)) == 4

    _, asked = await command(fake, general, alice, "privacy", [sub("forget-me")])
    data = asked.json["data"]
    assert data["flags"] & 64 and CONFIRM in data["content"]
    message = [m for m in fake.channel_messages(general) if CONFIRM in m["content"]][-1]
    confirm, cancel = button_ids(message)
    assert confirm != cancel

    interaction = await fake.dispatch_component(message, bob, confirm)  # not the asker
    answer = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"))
    assert (
        answer.json["type"] == 4 and "Only the member who asked" in answer.json["data"]["content"]
    )
    assert len(await stored(bot, general)) == 4

    interaction = await fake.dispatch_component(message, alice, confirm)
    answer = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"))
    assert answer.json["type"] == 7
    assert fake.messages[int(message["id"])]["content"].startswith("Deleted 2 message(s)")
    assert fake.messages[int(message["id"])]["components"] == []
    left = await stored(bot, general)
    assert [r.content for r in left if r.role == "user"] == ["bob's turn"]
    assert len(left) == 2 and await stored(bot, dm) == []


async def test_export_and_opt_out(fake: FakeDiscord, start_bot: Start):
    alice = fake.add_user("alice")
    general = fake.text_channel_ids[6]
    bot = await start_bot()
    await mention(fake, general, alice, "remember me")
    await reply_done(fake, bot, general)

    _, exported = await command(fake, general, alice, "privacy", [sub("export")])
    assert exported.headers["Content-Type"].startswith("multipart/form-data")
    data = exported.json["data"]
    assert data["flags"] & 64 and data["attachments"][0]["filename"] == "my-data.json"
    assert data["content"] == "Your stored data: 1 message(s)."

    _, out = await command(fake, general, alice, "privacy", [sub("opt-out")])
    assert out.json["data"]["content"].startswith("Opted out")
    await mention(fake, general, alice, "do not keep this")
    await reply_done(fake, bot, general, n_before=1)
    assert bot_posts(fake, general) == 2  # answered
    assert "do not keep this" not in [c for _, c in await everything_stored(bot)]
    assert len(await stored(bot, general)) == 2  # the first exchange only

    await command(fake, general, alice, "privacy", [sub("opt-in")])
    await mention(fake, general, alice, "keep this")
    await reply_done(fake, bot, general, n_before=2)
    assert [r.content for r in await stored(bot, general) if r.role == "user"] == [
        "remember me",
        "keep this",
    ]


async def test_the_retention_task_deletes_expired_turns(
    fake: FakeDiscord, start_bot: Start, monkeypatch
):
    monkeypatch.setattr("bot.privacy.RETENTION_EVERY_S", 0.05)
    alice = fake.add_user("alice")
    general = fake.text_channel_ids[7]
    bot = await start_bot(history_retention_days=30)
    await mention(fake, general, alice, "recent")
    await reply_done(fake, bot, general)
    old = datetime.now(UTC) - timedelta(days=31)
    async with bot.db.session() as s, s.begin():
        row = await repo.add_message(s, channel_id=general, role=Role.USER, content="ancient")
        row.created_at = old
    await fake.wait_until(lambda: bot.chat.privacy.purged >= 1, 30)
    assert [r.content for r in await stored(bot, general) if r.role == "user"] == ["recent"]


async def test_manage_messages_in_one_channel_gives_no_server_wide_control(
    fake: FakeDiscord, start_bot: Start
):
    """Discord resolves an interaction's permissions in its channel: an overwrite there must not
    open the server-wide commands (access lists, editors, server defaults)."""
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    random = fake.text_channel_ids[12]
    fake.allow_in_channel(bob, random, MANAGE_MESSAGES)  # Manage Messages in #random only
    bot = await start_bot()
    deny = sub("deny", option("user", alice["id"], USER))
    editors = sub("editors", option("persona", "everyone", 3))
    server = sub("set", option("scope", "server", 3), option("top_k", 3, 4))
    for name, options in (("access", [deny]), ("access", [editors]), ("settings", [server])):
        _, refused = await command(fake, random, bob, name, options)
        assert "across the server" in refused.json["data"]["content"], name
    alice_id = int(alice["id"])
    assert await bot.chat.access.allows(fake.guild_id, channel_ids=[random], user_id=alice_id)
    assert (await bot.chat.access.editing(fake.guild_id)).persona == "managers"
    assert (await bot.chat.get_server_settings(fake.guild_id)).top_k != 3
    # what belongs to #random itself he may do there: its memory
    _, forgot = await command(fake, random, bob, "forget")
    assert forgot.json["data"]["content"].startswith("Forgot")


async def test_forget_me_withdraws_a_message_waiting_in_line(fake: FakeDiscord, start_bot: Start):
    """Forget-me deletes a message still waiting behind another reply: when its turn comes it is
    neither answered nor stored (nor exported), and its "in line" placeholder goes at once."""
    from bot.cogs.chat import IN_LINE

    gate = Gate(after=2)  # bob's reply is held mid-way: alice's message waits behind it
    bot = await start_bot(runners=Runners(gate), placeholder_after_s=0.01)
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    general = fake.text_channel_ids[16]
    await bot.chat.update_settings(general, 1, max_tokens=16, temperature=1.0, seed=7)
    await mention(fake, general, bob, "you first")
    await gate.wait()
    waiting = await mention(fake, general, alice, "my secret")

    def answers() -> list[dict]:
        """What the bot posted in answer to alice's waiting message."""
        return [
            m
            for m in fake.channel_messages(general)
            if str((m.get("message_reference") or {}).get("message_id")) == waiting["id"]
        ]

    held = await fake.wait_until(lambda: [m for m in answers() if m["content"] == IN_LINE], 60)
    held_id = int(held[0]["id"])
    await eventually(lambda: _held(bot, held_id))  # remembered in alice's inbox row

    await command(fake, general, alice, "privacy", [sub("forget-me")])
    message = [m for m in fake.channel_messages(general) if CONFIRM in m["content"]][-1]
    interaction = await fake.dispatch_component(message, alice, button_ids(message)[0])
    await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"))
    assert "and 1 message(s) waiting" in fake.messages[int(message["id"])]["content"]
    await fake.wait_for(lambda r: r.method == "DELETE" and r.path.endswith(f"/{held_id}"))

    gate.open()  # bob's reply ends; alice's turn comes
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    assert answers() == []  # not answered, no note either, and the placeholder is gone
    assert all("my secret" not in content for _, content in await everything_stored(bot))
    _, exported = await command(fake, general, alice, "privacy", [sub("export")])
    assert exported.json["data"]["content"] == "Your stored data: 0 message(s)."


async def _held(bot, held_id: int) -> bool:
    async with bot.db.session() as s:
        waiting = (await s.scalars(select(PendingMessage))).all()
    return any(p.held_message_id == held_id for p in waiting)
