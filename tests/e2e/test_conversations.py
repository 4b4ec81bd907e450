"""End to end, conversations: threads, reply buttons (regenerate, continue, stop), text
attachments and the note when a conversation outgrows the context."""

from __future__ import annotations

from typing import Any

from bot.attachments import MAX_BYTES
from bot.cogs.controls import HISTORY_CUT, NOT_YOURS, STOPPED
from bot.cogs.triggers import ChatLimits
from tests.e2e.helpers import Start, command, option, reply_done, stored
from tests.engine.fakes import FakeClock, Gate, Runners
from tests.fakediscord import FakeDiscord


def mention(fake: FakeDiscord, text: str) -> str:
    return f"<@{fake.bot_user['id']}> {text}"


def buttons(message: dict[str, Any]) -> list[str]:
    """The custom ids of the buttons under a message, in order."""
    return [c["custom_id"] for row in message.get("components") or [] for c in row["components"]]


def bot_messages(fake: FakeDiscord, channel: int) -> list[dict[str, Any]]:
    """What the bot posted in a channel for everyone (ephemeral responses left out)."""
    return [
        m
        for m in fake.channel_messages(channel)
        if m["author"]["id"] == fake.bot_user["id"] and not m.get("flags", 0) & 64
    ]


async def settled(fake: FakeDiscord, bot: Any, message_id: int, after: int) -> None:
    """Wait until a regenerated or continued reply has its buttons back on `message_id` (a
    request recorded after the first `after` ones) and the bot is idle."""

    def done() -> bool:
        return any(
            r.method == "PATCH"
            and r.path.endswith(f"/messages/{message_id}")
            and any(b.startswith("reply:regen:") for b in buttons(r.json))
            for r in fake.requests[after:]
        )

    await fake.wait_until(done, 60)
    await fake.wait_until(lambda: bot.active_replies == 0, 60)


# ---- threads --------------------------------------------------------------------------------


async def test_a_thread_is_its_own_conversation(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    parent = fake.text_channel_ids[0]
    await bot.chat.update_settings(parent, 1, max_tokens=8)
    await fake.dispatch_message(parent, alice, mention(fake, "in the channel"), [fake.bot_user])
    await reply_done(fake, bot, parent)
    thread = await fake.add_thread(parent, "side talk", owner=alice)
    await fake.wait_until(lambda: bot.get_channel(thread))
    await bot.chat.update_settings(thread, 1, max_tokens=8)
    await fake.dispatch_message(thread, alice, mention(fake, "in the thread"), [fake.bot_user])
    await reply_done(fake, bot, thread)
    in_parent, in_thread = await stored(bot, parent), await stored(bot, thread)
    assert [r.content for r in in_parent if r.role == "user"] == ["in the channel"]
    assert [r.content for r in in_thread if r.role == "user"] == ["in the thread"]
    assert [r.role for r in in_thread] == ["user", "assistant"]
    # the thread's prompt held only its own turn, not the parent's exchange
    assert in_thread[1].prompt_tokens < in_parent[1].prompt_tokens + in_parent[1].token_count
    posted = bot_messages(fake, thread)
    assert posted and int(posted[0]["id"]) == in_thread[1].discord_message_id


async def test_autoreply_in_threads_keeps_the_channel_readable(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    admin, alice = fake.add_user("admin", admin=True), fake.add_user("alice")
    parent = fake.text_channel_ids[1]
    await bot.chat.update_settings(parent, 1, max_tokens=8)
    sub = {
        "type": 1,
        "name": "autoreply",
        "options": [option("enabled", True, 5), option("threads", True, 5)],
    }
    _, callback = await command(fake, parent, admin, "channel", [sub])
    assert "each in a new thread" in callback.json["data"]["content"]

    asked = await fake.dispatch_message(parent, alice, "how do threads work here?")
    made = await fake.wait_for(lambda r: r.path.endswith(f"/messages/{asked['id']}/threads"), 60)
    assert made.json["name"] == "how do threads work here?"
    thread = int(asked["id"])  # a thread started on a message takes the message's id
    await reply_done(fake, bot, thread)
    assert bot_messages(fake, parent) == []  # nothing but the thread in the channel
    await fake.dispatch_message(thread, alice, "and a follow-up without a mention")
    await reply_done(fake, bot, thread, n_before=1)
    rows = await stored(bot, thread)
    assert [r.role for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[0].content == "how do threads work here?"
    assert await stored(bot, parent) == []
    assert len(fake.thread_ids(parent)) == 1  # the follow-up stayed in the same thread


async def test_archived_and_locked_threads_get_no_reply_and_no_error(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    parent = fake.text_channel_ids[2]
    locked = await fake.add_thread(parent, "locked", owner=alice)
    archived = await fake.add_thread(parent, "archived", owner=alice)
    await fake.wait_until(lambda: bot.get_channel(locked) and bot.get_channel(archived))
    await fake.set_thread_state(locked, locked=True)
    await fake.set_thread_state(archived, archived=True)
    await fake.wait_until(lambda: bot.get_channel(locked).locked)
    await fake.wait_until(lambda: bot.get_channel(archived) is None)  # leaves discord.py's cache
    await fake.dispatch_message(locked, alice, mention(fake, "hello?"), [fake.bot_user])
    await fake.dispatch_message(archived, alice, mention(fake, "anyone?"), [fake.bot_user])
    await fake.wait_for(lambda r: r.method == "GET" and r.path == f"/channels/{archived}")
    # a message answered elsewhere afterwards: the closed threads' turns have been decided
    open_channel = fake.text_channel_ids[3]
    await fake.dispatch_message(open_channel, alice, mention(fake, "here"), [fake.bot_user])
    await reply_done(fake, bot, open_channel)
    for thread in (locked, archived):
        assert not [r for r in fake.requests if r.method != "GET" and str(thread) in r.path]
        assert await stored(bot, thread) == []


# ---- reply buttons --------------------------------------------------------------------------


async def test_buttons_follow_the_last_reply_and_regenerate_replaces_it(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice, mallory = fake.add_user("alice"), fake.add_user("mallory")
    channel = fake.text_channel_ids[4]
    await bot.chat.update_settings(channel, 1, max_tokens=12, temperature=1.0)
    await fake.dispatch_message(channel, alice, mention(fake, "first"), [fake.bot_user])
    await reply_done(fake, bot, channel)
    first_row = (await stored(bot, channel))[1]
    first = fake.messages[first_row.discord_message_ids[-1]]
    assert buttons(first)[0] == f"reply:regen:{first_row.id}"
    created = fake.find("POST", f"/channels/{channel}/messages")[0]
    assert buttons(created.json) == [f"reply:stop:{first_row.id}"]  # while it streamed

    await fake.dispatch_message(channel, alice, mention(fake, "second"), [fake.bot_user])
    await reply_done(fake, bot, channel, n_before=1)
    rows = await stored(bot, channel)
    second = fake.messages[rows[3].discord_message_ids[-1]]
    assert buttons(second)[0] == f"reply:regen:{rows[3].id}"
    assert buttons(fake.messages[int(first["id"])]) == []  # only the last reply keeps them

    # someone else may not press them; a stale button says so
    pressed = await fake.dispatch_component(second, mallory, f"reply:regen:{rows[3].id}")
    refused = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{pressed['id']}/"))
    assert refused.json["data"]["content"] == NOT_YOURS and refused.json["data"]["flags"] & 64

    n_requests = len(fake.requests)
    pressed = await fake.dispatch_component(second, alice, f"reply:regen:{rows[3].id}")
    ack = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{pressed['id']}/"))
    assert ack.json["type"] == 6  # deferred update: the message itself changes
    await settled(fake, bot, int(second["id"]), n_requests)
    after = await stored(bot, channel)
    assert [r.id for r in after] == [r.id for r in rows]  # replaced, not added
    regenerated = after[3]
    shown = "".join(fake.messages[i]["content"] for i in regenerated.discord_message_ids)
    assert shown.strip() == regenerated.content.strip()
    assert regenerated.status == "complete"
    assert buttons(fake.messages[regenerated.discord_message_ids[-1]])[0].startswith("reply:regen")
    assert not fake.find("POST", f"/channels/{channel}/messages")[2:]  # nothing new posted


async def test_continue_extends_a_reply_cut_by_max_tokens(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[5]
    await bot.chat.update_settings(channel, 1, max_tokens=6, temperature=1.0, seed=7)
    await fake.dispatch_message(channel, alice, mention(fake, "long one"), [fake.bot_user])
    await reply_done(fake, bot, channel)
    row = (await stored(bot, channel))[1]
    assert row.finish_reason == "length"  # seeded: no end of turn in the first 6 tokens
    last = fake.messages[row.discord_message_ids[-1]]
    assert buttons(last) == [f"reply:regen:{row.id}", f"reply:cont:{row.id}"]

    n_requests = len(fake.requests)
    await fake.dispatch_component(last, alice, f"reply:cont:{row.id}")
    await settled(fake, bot, int(last["id"]), n_requests)
    longer = (await stored(bot, channel))[1]
    assert longer.id == row.id and longer.content.startswith(row.content)
    assert len(longer.content) > len(row.content)
    assert longer.token_count > row.token_count
    shown = "".join(fake.messages[i]["content"] for i in longer.discord_message_ids)
    assert shown.strip() == longer.content.strip()


async def test_stop_ends_a_streaming_reply_for_the_asker(
    fake: FakeDiscord, start_bot: Start
) -> None:
    gate = Gate(after=4)  # the engine waits mid-reply until stop was pressed
    bot = await start_bot(runners=Runners(gate))
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[6]
    # seeded as in the shutdown scenario: this reply has no end-of-turn token, it runs long
    await bot.chat.update_settings(channel, 1, max_tokens=200, temperature=1.0, seed=7)
    await fake.dispatch_message(channel, alice, mention(fake, "long one"), [fake.bot_user])
    await gate.wait()
    created = await fake.wait_for(
        lambda r: r.method == "POST" and r.path == f"/channels/{channel}/messages"
    )
    (stop,) = buttons(created.json)
    first = bot_messages(fake, channel)[0]
    pressed = await fake.dispatch_component(first, alice, stop)
    await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{pressed['id']}/"))
    gate.open()
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    row = (await stored(bot, channel))[1]
    assert (row.status, row.finish_reason) == ("interrupted", "stopped")
    assert row.token_count < 200
    shown = "".join(fake.messages[i]["content"] for i in row.discord_message_ids)
    assert shown.endswith(f"*{STOPPED}*")
    assert shown.startswith(row.content.strip()[:20])
    assert buttons(fake.messages[row.discord_message_ids[-1]]) == [f"reply:regen:{row.id}"]
    assert buttons(fake.messages[row.discord_message_ids[0]])[-1:] != [stop]


async def test_buttons_work_after_a_restart(fake: FakeDiscord, start_bot: Start) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[7]
    await bot.chat.update_settings(channel, 1, max_tokens=8, temperature=1.0)
    await fake.dispatch_message(channel, alice, mention(fake, "hi"), [fake.bot_user])
    await reply_done(fake, bot, channel)
    row = (await stored(bot, channel))[1]
    await start_bot.stop(bot)  # type: ignore[attr-defined]

    bot = await start_bot()
    message = fake.messages[row.discord_message_ids[-1]]
    n_requests = len(fake.requests)
    pressed = await fake.dispatch_component(message, alice, f"reply:regen:{row.id}")
    ack = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{pressed['id']}/"))
    assert ack.json["type"] == 6
    await settled(fake, bot, int(message["id"]), n_requests)
    again = (await stored(bot, channel))[1]
    assert again.id == row.id and again.status == "complete"
    assert again.updated_at is not None and again.updated_at > row.updated_at


# ---- attachments ----------------------------------------------------------------------------


async def test_text_attachments_are_read_and_others_get_a_note(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[8]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    notes = fake.attachment("notes.txt", "the secret word is plum\n".encode("utf-16"), "text/plain")
    image = fake.attachment("cat.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png")
    huge = fake.attachment("dump.log", b"x" * 64, "text/plain", size=MAX_BYTES + 1)
    await fake.dispatch_message(
        channel,
        alice,
        mention(fake, "what does it say?"),
        [fake.bot_user],
        attachments=[notes, image, huge],
    )
    await reply_done(fake, bot, channel)
    rows = await stored(bot, channel)
    assert rows[0].content.startswith("what does it say?\n\n[file notes.txt]\n```\n")
    assert "the secret word is plum" in rows[0].content
    assert "cat.png" not in rows[0].content and "dump.log" not in rows[0].content
    assert fake.downloads == [int(notes["id"])]  # the oversized file was never fetched
    shown = "".join(fake.messages[i]["content"] for i in rows[1].discord_message_ids)
    assert "I can only read text files" in shown and "cat.png" in shown
    assert "dump.log is too large" in shown
    assert rows[1].content not in ("", shown)  # the notes are shown, not stored

    # an image alone: a note, no generation, nothing stored
    alone = fake.attachment("photo.jpg", b"\xff\xd8\xff" + bytes(32), "image/jpeg")
    n_before = len(fake.find("POST", f"/channels/{channel}/messages"))
    await fake.dispatch_message(
        channel, alice, mention(fake, ""), [fake.bot_user], attachments=[alone]
    )
    await reply_done(fake, bot, channel, n_before=n_before)
    reply = fake.find("POST", f"/channels/{channel}/messages")[-1].json
    assert "I can only read text files" in reply["content"] and "photo.jpg" in reply["content"]
    assert len(await stored(bot, channel)) == 2


async def test_a_long_attachment_is_cut_to_the_budget_with_a_note(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[9]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    text = "".join(f"line {i}: some words to read\n" for i in range(2000))
    long = fake.attachment("book.md", text.encode(), None)
    await fake.dispatch_message(
        channel, alice, mention(fake, "summarize"), [fake.bot_user], attachments=[long]
    )
    await reply_done(fake, bot, channel)
    rows = await stored(bot, channel)
    model = bot.backend.model
    assert "line 0: some words" in rows[0].content and "line 1999" not in rows[0].content
    assert len(model.encode_text(rows[0].content)) <= model.max_context - 8
    shown = fake.messages[rows[1].discord_message_ids[-1]]["content"]
    assert "book.md is longer than I can read at once" in shown


async def test_ten_files_with_long_names_fit_and_a_refused_message_is_not_stored(
    fake: FakeDiscord, start_bot: Start
) -> None:
    """The `[file NAME]` headers count in the budget: ten files (Discord's most) with 80-char
    names are cut to their share, or left out with a note where not even their headers fit
    (the tiny model's context is 256 tokens), and the message is answered, not refused as too
    long. A message that is refused as too long does not stay as a turn."""
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[12]
    await bot.chat.update_settings(channel, 1, max_tokens=8)
    body = "".join(f"row {i}: a few words of a table\n" for i in range(300)).encode()
    files = [
        fake.attachment(f"{i:02d}-" + "long-name-" * 8 + ".txt", body, "text/plain")
        for i in range(10)
    ]
    await fake.dispatch_message(
        channel, alice, mention(fake, "compare these"), [fake.bot_user], attachments=files
    )
    await reply_done(fake, bot, channel)
    rows = await stored(bot, channel)
    assert [r.role for r in rows] == ["user", "assistant"]
    model = bot.backend.model
    read = rows[0].content.count("[file ")
    assert 0 < read < 10
    assert len(model.encode_text(rows[0].content)) <= (model.max_context - 8) // 2
    shown = "".join(fake.messages[i]["content"] for i in rows[1].discord_message_ids)
    assert "too long" not in shown and "is longer than I can read at once" in shown
    assert shown.count("I had no room left to read") == 10 - read

    words = "word"
    while len(model.encode_text(words)) < model.max_context:
        words += " word"
    n_before = len(bot_messages(fake, channel))
    await fake.dispatch_message(channel, alice, mention(fake, words), [fake.bot_user])
    await reply_done(fake, bot, channel, n_before=n_before)
    refusal = bot_messages(fake, channel)[-1]["content"]
    assert "too long for me to read" in refusal
    assert [r.id for r in await stored(bot, channel)] == [r.id for r in rows]


# ---- history cut ----------------------------------------------------------------------------


async def test_history_cut_is_said_once_per_conversation(
    fake: FakeDiscord, start_bot: Start
) -> None:
    bot = await start_bot()
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[10]
    model = bot.backend.model
    await bot.chat.update_settings(channel, 1, max_tokens=96)
    budget = model.max_context - 96
    words = "word"
    while len(model.encode_text(words)) < budget // 2:
        words += " word"

    async def ask(n: int) -> str:
        await fake.dispatch_message(channel, alice, mention(fake, f"{n} {words}"), [fake.bot_user])
        await reply_done(fake, bot, channel, n_before=len(bot_messages(fake, channel)))
        row = (await stored(bot, channel))[-1]
        return "".join(fake.messages[i]["content"] for i in row.discord_message_ids)

    assert HISTORY_CUT not in await ask(1)  # it all fits
    assert (await ask(2)).endswith(f"*{HISTORY_CUT}*")  # the first turn no longer fits
    assert HISTORY_CUT not in await ask(3)  # said once
    await start_bot.stop(bot)  # type: ignore[attr-defined]
    bot = await start_bot()
    assert HISTORY_CUT not in await ask(4)  # remembered across a restart
    await bot.chat.forget(channel, 1)  # a new conversation
    assert HISTORY_CUT not in await ask(5)
    assert (await ask(6)).endswith(f"*{HISTORY_CUT}*")


async def test_a_thread_archived_mid_reply_ends_it_quietly(
    fake: FakeDiscord, start_bot: Start
) -> None:
    # the engine is held after its first steps until the thread is archived: the reply cannot
    # finish before the archive lands, however fast the machine (it did, 9 runs in 10)
    gate = Gate(after=4)
    bot = await start_bot(runners=Runners(gate))
    alice = fake.add_user("alice")
    thread = await fake.add_thread(fake.text_channel_ids[11], "soon archived", owner=alice)
    await fake.wait_until(lambda: bot.get_channel(thread))
    await bot.chat.update_settings(thread, 1, max_tokens=200, temperature=1.0, seed=7)
    await fake.dispatch_message(thread, alice, mention(fake, "long one"), [fake.bot_user])
    await gate.wait()
    await fake.wait_for(lambda r: r.method == "POST" and r.path == f"/channels/{thread}/messages")
    await fake.set_thread_state(thread, archived=True)
    gate.open()  # the next text the bot shows is refused: the thread is archived
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    posted = [m["content"] for m in bot_messages(fake, thread)]
    assert len(posted) == 1 and "Sorry" not in posted[0]  # no apology, no error note
    row = (await stored(bot, thread))[1]
    assert row.status == "interrupted" and row.content.strip()  # what was shown is kept


async def press_and_answer(fake: FakeDiscord, message: dict, user: dict, custom_id: str) -> dict:
    """Press a button; the bot's first callback to that press (its JSON)."""
    pressed = await fake.dispatch_component(message, user, custom_id)
    callback = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{pressed['id']}/"))
    return callback.json


async def test_reply_buttons_pass_the_same_gate_as_messages(
    fake: FakeDiscord, start_bot: Start
) -> None:
    """A press that generates is a request: it counts against the rate limits and is refused
    with the same note, and the access lists and the presser's opt-out apply to it."""
    bot = await start_bot()
    clock = FakeClock()  # the rate windows move only when the test moves them
    bot.get_cog("Chat").limits = ChatLimits.per_minute(2, 1000, clock=clock)
    admin = fake.add_user("admin", admin=True)
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    here, there, third = fake.text_channel_ids[13:16]
    for channel in (here, there, third):
        await bot.chat.update_settings(channel, 1, max_tokens=8, temperature=1.0)

    # rate limits: alice's message and one press are her 2 requests a minute; the next is refused
    await fake.dispatch_message(here, alice, mention(fake, "hi"), [fake.bot_user])
    await reply_done(fake, bot, here)
    row = (await stored(bot, here))[1]
    message = fake.messages[row.discord_message_ids[-1]]
    n_requests = len(fake.requests)
    assert (await press_and_answer(fake, message, alice, f"reply:regen:{row.id}"))["type"] == 6
    await settled(fake, bot, row.discord_message_ids[-1], n_requests)
    regenerated = (await stored(bot, here))[1].content
    refused = await press_and_answer(fake, message, alice, f"reply:regen:{row.id}")
    assert refused["data"]["content"].startswith("You're sending messages quickly")
    assert refused["data"]["flags"] & 64
    assert (await stored(bot, here))[1].content == regenerated  # nothing generated
    clock.advance(61)  # a minute later she may again

    # access lists: bob, denied after his reply, cannot have it regenerated by pressing
    await fake.dispatch_message(there, bob, mention(fake, "hello"), [fake.bot_user])
    await reply_done(fake, bot, there)
    row = (await stored(bot, there))[1]
    deny = {"type": 1, "name": "deny", "options": [option("user", bob["id"], 6)]}
    await command(fake, there, admin, "access", [deny])
    message = fake.messages[row.discord_message_ids[-1]]
    refused = await press_and_answer(fake, message, bob, f"reply:regen:{row.id}")
    assert "access lists" in refused["data"]["content"] and refused["data"]["flags"] & 64
    assert (await stored(bot, there))[1].content == row.content

    # opt-out: what carol's press would generate is stored in her conversation: refused
    await fake.dispatch_message(third, carol, mention(fake, "hey"), [fake.bot_user])
    await reply_done(fake, bot, third)
    row = (await stored(bot, third))[1]
    await bot.chat.privacy.set_opted_out(int(carol["id"]), True)
    message = fake.messages[row.discord_message_ids[-1]]
    refused = await press_and_answer(fake, message, carol, f"reply:regen:{row.id}")
    assert "opted out" in refused["data"]["content"]
    assert (await stored(bot, third))[1].content == row.content
