"""ChatService with a scripted engine: turns stored, ordering, concurrency, errors, settings."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from sqlalchemy import select

from bot.errors import (
    BusyError,
    GenerationFailedError,
    MessageTooLongError,
    NotLatestReplyError,
    ReplyCutError,
    RestartingError,
)
from bot.generation import SettingsError
from bot.service import ChatService
from bot.storage.db import Database
from bot.storage.models import AuditEntry, Message
from bot.turns import IncomingMessage, Speaker
from tests.bot_core.fakes import FakeEngine, first_answering_second_waiting

BOT = Speaker(900, "Bot", is_bot=True)
ALICE = Speaker(1, "alice")
BOB = Speaker(2, "bob")


def message(text: str, channel: int = 10, author: Speaker = ALICE, message_id: int | None = None):
    return IncomingMessage(channel, 5, author, text, message_id=message_id)


async def converse(
    service: ChatService, msg: IncomingMessage, posted: list[int] | None = None
) -> str:
    async with service.reply(msg, bot=BOT) as reply:
        pieces = [piece async for piece in reply]
        reply.message_ids.extend(posted or [])
    return "".join(pieces)


async def test_a_reply_streams_and_both_turns_are_stored(service: ChatService, engine: FakeEngine):
    text = await converse(service, message("hello", message_id=111), posted=[222, 223])
    assert text == engine.reply_text
    user, bot = await service.recent_messages(10, 10)
    assert (user.role, user.content, user.author_id, user.author_name) == (
        "user",
        "hello",
        1,
        "alice",
    )
    assert user.discord_message_ids == [111] and user.token_count == len(b"hello")
    assert (bot.role, bot.content, bot.author_id, bot.status) == (
        "assistant",
        text,
        900,
        "complete",
    )
    assert bot.discord_message_ids == [222, 223] and bot.discord_message_id == 222
    assert bot.model_version == "fake@1" and bot.finish_reason == "stop"
    assert bot.token_count == len(text.encode()) and bot.prompt_tokens == len(
        engine.submitted[0][0]
    )
    assert bot.ttft_ms == 1.0 and bot.duration_ms is not None and bot.duration_ms >= 0


async def test_history_and_names_reach_the_next_prompt(service: ChatService, engine: FakeEngine):
    await converse(service, message("first from alice"))
    await converse(service, message("then bob", author=BOB))
    prompt = engine.prompt_text(1)
    assert "<|im_start|>user\nalice: first from alice<|im_end|>" in prompt
    assert f"<|im_start|>assistant\n{engine.reply_text}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nbob: then bob<|im_end|>\n<|im_start|>assistant\n")


async def test_history_is_trimmed_to_the_budget(db: Database, settings):
    engine = FakeEngine(max_context=400, reply_text="ok")
    service = ChatService(db, engine, settings)
    await service.update_settings(10, 1, max_tokens=100)
    for i in range(12):
        await converse(service, message(f"message number {i:02d}"))
    last = engine.prompt_text(11)
    assert len(engine.submitted[11][0]) <= 300
    assert "message number 11" in last and "message number 00" not in last
    assert len(await service.recent_messages(10, 100)) == 24  # older turns stay in the database


async def test_long_conversations_extend_their_prompt_between_cuts(db: Database, settings):
    """Once the history outgrows the budget, most prompts still start with the previous prompt
    (the engine keeps its KV), instead of every turn dropping an old turn from the front."""
    engine = FakeEngine(max_context=1600, reply_text="fine, thanks")
    service = ChatService(db, engine, settings)
    await service.update_settings(10, 1, max_tokens=100)
    for i in range(30):
        await converse(service, message(f"message number {i:02d}"))
    prompts = [engine.prompt_text(i) for i in range(30)]
    assert all(len(engine.submitted[i][0]) <= 1500 for i in range(30))
    extended = [later.startswith(earlier) for earlier, later in itertools.pairwise(prompts)]
    cuts = extended.count(False)
    assert 1 <= cuts <= 3  # cutting one turn at a time would break the prefix ~14 times
    assert "message number 29" in prompts[-1] and "message number 00" not in prompts[-1]


async def test_persona_comes_first_and_forget_empties_the_memory(
    service: ChatService, engine: FakeEngine
):
    await service.set_persona(10, "You are a pirate.", actor_id=7)
    assert await service.get_persona(10) == "You are a pirate."
    await converse(service, message("ahoy"))
    assert engine.prompt_text(0).startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert await service.forget(10, actor_id=7) == 2
    await converse(service, message("who am I?"))
    assert "ahoy" not in engine.prompt_text(1)
    await service.clear_persona(10, actor_id=7)
    await converse(service, message("plain"))
    assert not engine.prompt_text(2).startswith("<|im_start|>system")
    with pytest.raises(SettingsError, match="empty"):
        await service.set_persona(10, "   ", actor_id=7)
    async with service.db.session() as s:
        actions = [a.action for a in await s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == ["persona.set", "forget", "persona.clear"]


async def test_a_persona_is_measured_in_tokens_against_the_model_context(settings, db):
    """A persona under the character limit that would fill the prompt is refused at set time,
    in tokens; one that fits leaves room for a conversation that still gets answered."""
    engine = FakeEngine(max_context=600)  # byte tokens; budget 600 - 256 = 344, persona <= 172
    service = ChatService(db, engine, settings)
    with pytest.raises(SettingsError, match=r"200 tokens, at most 172 \(half of"):
        await service.set_persona(10, "p" * 200, actor_id=7)
    assert await service.get_persona(10) is None
    await service.set_persona(10, "p" * 172, actor_id=7)
    reply = await converse(service, message("a question of a reasonable length, answered"))
    assert reply  # the conversation still fits beside the persona


async def test_settings_are_stored_validated_and_used(service: ChatService, engine: FakeEngine):
    default = await service.get_settings(10)
    updated = await service.update_settings(10, 3, temperature=0.2, max_tokens="5", seed=42)
    assert (updated.temperature, updated.max_new_tokens, updated.seed) == (0.2, 5, 42)
    assert updated.top_p == default.top_p
    with pytest.raises(SettingsError, match="temperature must be between 0 and 2"):
        await service.update_settings(10, 3, temperature=2.5)
    assert (await service.get_settings(10)).temperature == 0.2  # the bad change stored nothing
    text = await converse(service, message("hi"))
    params = engine.submitted[0][1]
    assert (params.temperature, params.max_new_tokens, params.seed) == (0.2, 5, 42)
    assert text == engine.reply_text[:5]  # the fake stops at max_new_tokens
    reset = await service.reset_settings(10, 3)
    assert reset == default


async def test_model_defaults_come_from_the_manifest(db: Database, settings):
    engine = FakeEngine(generation={"temperature": 0.33, "max_new_tokens": 2000})
    service = ChatService(db, engine, settings)
    s = await service.get_settings(10)
    assert s.temperature == 0.33 and s.max_new_tokens == 1024


async def test_replies_in_one_channel_run_in_arrival_order(db: Database, settings):
    engine = FakeEngine(delay_s=0.005, reply_text="a b c")
    service = ChatService(db, engine, settings)
    texts = [f"msg {i}" for i in range(6)]
    await asyncio.gather(*(converse(service, message(t)) for t in texts))
    assert engine.max_active == 1
    stored = await service.recent_messages(10, 100)
    assert [m.content for m in stored if m.role == "user"] == texts
    assert [m.role for m in stored] == ["user", "assistant"] * 6
    for i, prompt in enumerate(engine.submitted):  # each prompt saw every earlier exchange
        assert bytes(prompt[0]).decode().count("<|im_start|>assistant\na b c") == i


async def test_channels_are_answered_concurrently(db: Database, settings):
    """Eight channels' replies are all streaming at once: the streams wait on a gate opened only
    when all eight are active, which never happens if channels were answered one at a time."""
    engine = FakeEngine(gate=asyncio.Event(), reply_text="one two three four")
    service = ChatService(db, engine, settings)
    channels = range(100, 108)
    replies = asyncio.gather(*(converse(service, message("hi", channel=c)) for c in channels))
    async with asyncio.timeout(20):
        while engine.active < len(channels):
            await asyncio.sleep(0.01)
    engine.gate.set()
    assert await replies == [engine.reply_text] * len(channels)
    for c in channels:
        assert [m.role for m in await service.recent_messages(c, 10)] == ["user", "assistant"]
    assert service._queues._locks == {}  # idle channels keep no lock


async def test_consumer_failure_leaves_the_partial_reply_interrupted(service: ChatService):
    class Gone(Exception):
        pass

    with pytest.raises(Gone):
        async with service.reply(message("tell me"), bot=BOT) as reply:
            async for piece in reply:
                reply.message_ids.append(5)
                if piece.strip() == "there,":
                    raise Gone
    bot = (await service.recent_messages(10, 10))[-1]
    assert (bot.status, bot.content, bot.finish_reason) == ("interrupted", "Hi there,", "cancelled")
    assert bot.discord_message_ids == [5, 5]


async def test_a_crash_mid_reply_is_marked_interrupted_at_the_next_start(
    db_url, settings, monkeypatch
):
    monkeypatch.setattr("bot.reply.PARTIAL_FLUSH_S", 0.0)  # store after every piece
    db = await Database.open(db_url)
    service = ChatService(db, FakeEngine(), settings)
    reply = service.reply(message("hello"), bot=BOT)
    await reply.__aenter__()
    pieces = aiter(reply)
    assert [await anext(pieces), await anext(pieces)] == ["Hi", " there,"]
    await db.close()  # the process dies: __aexit__ never runs

    db2 = await Database.open(db_url)
    async with db2.session() as s:
        rows = (await s.scalars(select(Message).order_by(Message.id))).all()
    await db2.close()
    assert [(r.role, r.status) for r in rows] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    assert rows[1].content == "Hi"  # stored by the flush after the first piece
    assert rows[1].finish_reason == "restart"  # why it ended is recorded
    assert db2.interrupted == [(10, rows[1].discord_message_ids, rows[1].id)]


async def test_a_reply_stores_its_discord_message_as_soon_as_it_is_posted(
    db_url, settings, monkeypatch
):
    """A crash right after a reply's first Discord message was posted (before any timed flush)
    still leaves its id, so the next start puts the interrupted note on that message."""
    monkeypatch.setattr("bot.reply.PARTIAL_FLUSH_S", 3600.0)  # no timed flush here
    db = await Database.open(db_url)
    service = ChatService(db, FakeEngine(), settings)
    reply = service.reply(message("hello"), bot=BOT)
    await reply.__aenter__()
    pieces = aiter(reply)
    assert await anext(pieces) == "Hi"
    reply.message_ids.append(222)  # the first piece is shown as Discord message 222
    assert await anext(pieces) == " there,"
    await db.close()  # the process dies: __aexit__ never runs

    db2 = await Database.open(db_url)
    await db2.close()
    assert [(c, ids) for c, ids, _ in db2.interrupted] == [(10, [222])]


async def test_a_placeholder_shown_before_the_inbox_row_is_written_is_stored_with_it(
    db_url, settings
):
    """The cog shows the "in line" placeholder on a timer beside storing the message: when it
    comes first, the inbox row written after still gets its id (else a crash leaves it shown
    forever: no restart knows of it)."""
    db = await Database.open(db_url)
    engine = FakeEngine(gate=asyncio.Event())
    service = ChatService(db, engine, settings)
    first = service.reply(message("one", message_id=501), bot=BOT)
    await first.__aenter__()
    waiting = service.reply(message("two", message_id=502), bot=BOT)
    await waiting.hold(777)  # before the message is even accepted
    entering = asyncio.create_task(waiting.__aenter__())
    await first_answering_second_waiting(service, engine)
    [pending] = await service.pending()
    assert (pending.discord_message_id, pending.held_message_id) == (502, 777)
    await db.close()  # the process dies
    entering.cancel()


async def test_a_placeholder_is_stored_where_a_restart_finds_it(db_url, settings):
    """The "in line" placeholder (cogs/chat.py) of a message still waiting goes into its inbox
    row; of a reply already started but without text yet, into the reply's own row: either way
    a crash leaves its id where the next start looks (the answer replaces it, or it is marked
    interrupted)."""
    db = await Database.open(db_url)
    engine = FakeEngine()
    service = ChatService(db, engine, settings)
    first = service.reply(message("one", message_id=501), bot=BOT)
    await first.__aenter__()
    waiting = service.reply(message("two", message_id=502), bot=BOT)
    entering = asyncio.create_task(waiting.__aenter__())
    await first_answering_second_waiting(service, engine)
    await waiting.hold(777)  # shown while it waits behind the first
    [pending] = await service.pending()
    assert (pending.discord_message_id, pending.held_message_id) == (502, 777)
    await first.hold(888)  # the first reply's placeholder, before any text
    await db.close()  # the process dies
    entering.cancel()

    db2 = await Database.open(db_url)
    await db2.close()
    assert [(c, ids) for c, ids, _ in db2.interrupted] == [(10, [888])]


async def test_a_message_waiting_behind_a_reply_is_stored_at_once_and_survives_a_crash(
    db_url, settings
):
    """The second message of a channel waits for the first reply; it is in the inbox the
    moment it is accepted, so a crash then loses nothing, and after the restart it is what the
    service reports as accepted and never answered."""
    db = await Database.open(db_url)
    engine = FakeEngine(gate=asyncio.Event())
    service = ChatService(db, engine, settings)
    first = asyncio.create_task(converse(service, message("first", message_id=101)))
    second = asyncio.create_task(converse(service, message("second", message_id=102)))
    await first_answering_second_waiting(service, engine)
    waiting = await service.pending()
    assert [(p.content, p.discord_message_id) for p in waiting] == [("second", 102)]
    first.cancel()
    second.cancel()  # the process dies: nothing else runs
    await asyncio.gather(first, second, return_exceptions=True)
    await db.close()

    db2 = await Database.open(db_url)
    try:
        again = ChatService(db2, FakeEngine(), settings)
        [left] = await again.pending()
        assert (left.content, left.author_id, left.channel_id) == ("second", ALICE.id, 10)
        text = await converse_pending(again, left)
        assert text  # answered after the restart, and it left the inbox
        assert await again.pending() == []
        rows = await again.recent_messages(10, 10)
        assert [(r.role, r.content) for r in rows if r.role == "user"] == [
            ("user", "first"),
            ("user", "second"),
        ]
    finally:
        await db2.close()


async def converse_pending(service: ChatService, pending) -> str:
    msg = IncomingMessage(
        pending.channel_id,
        5,
        Speaker(pending.author_id, pending.author_name),
        pending.content,
        message_id=pending.discord_message_id,
    )
    async with service.reply(msg, bot=BOT, pending_id=pending.id) as reply:
        return "".join([piece async for piece in reply])


async def test_a_message_waiting_at_shutdown_is_declined_and_leaves_the_inbox(service, engine):
    """Shutdown: a message whose turn had not come gets RestartingError (the cog tells its
    author to ask again), reaches no engine, and leaves the inbox."""
    engine.gate = asyncio.Event()
    first = asyncio.create_task(converse(service, message("first")))
    second = asyncio.create_task(converse(service, message("second")))
    await first_answering_second_waiting(service, engine)
    engine.closed = True  # the bot is closing
    engine.gate.set()
    await first
    with pytest.raises(RestartingError) as info:
        await second
    assert "restarting" in info.value.user_message
    assert len(engine.submitted) == 1
    assert await service.pending() == []
    with pytest.raises(RestartingError):  # and a message accepted while closing, likewise
        await converse(service, message("third"))
    assert await service.pending() == []


async def test_engine_errors_become_friendly_reply_errors(db: Database, settings):
    busy = ChatService(db, FakeEngine(max_queue=0), settings)
    with pytest.raises(BusyError) as info:
        await converse(busy, message("hi"))
    assert "try again" in info.value.user_message

    failing = ChatService(db, FakeEngine(fail_after=2), settings)
    with pytest.raises(GenerationFailedError) as info:
        await converse(failing, message("hi", channel=11))
    assert info.value.user_message.startswith("Sorry")
    bot = (await failing.recent_messages(11, 10))[-1]
    assert (bot.status, bot.content, bot.finish_reason) == ("interrupted", "Hi there,", "error")

    tiny = ChatService(db, FakeEngine(max_context=300), settings)
    with pytest.raises(MessageTooLongError):
        await converse(tiny, message("x" * 200, channel=12))


@pytest.mark.parametrize(
    ("reason", "note"),
    [("timeout", "time limit"), ("cancelled", "restarting")],
)
async def test_a_reply_the_engine_cuts_keeps_its_text_and_says_so(
    db: Database, settings, reason: str, note: str
):
    service = ChatService(db, FakeEngine(cut_after=2, cut_reason=reason), settings)
    pieces: list[str] = []
    with pytest.raises(ReplyCutError) as info:
        async with service.reply(message("tell me"), bot=BOT) as reply:
            async for piece in reply:
                pieces.append(piece)
    assert pieces == ["Hi", " there,"]  # everything streamed before the cut reached the reader
    assert note in info.value.user_message
    bot = (await service.recent_messages(10, 10))[-1]
    assert (bot.status, bot.content, bot.finish_reason) == ("interrupted", "Hi there,", reason)


async def test_ask_uses_no_history_and_stores_nothing(service: ChatService, engine: FakeEngine):
    await service.set_persona(10, "You are a pirate.", actor_id=1)
    await converse(service, message("remember this"))
    async with service.ask("write a haiku", channel_id=10, author=BOB) as reply:
        text = "".join([piece async for piece in reply])
    assert text == engine.reply_text and reply.result.finish_reason == "stop"
    assert (
        engine.prompt_text(1)
        == "<|im_start|>user\nwrite a haiku<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(await service.recent_messages(10, 10)) == 2


async def test_autoreply_and_audit(service: ChatService):
    assert not await service.is_autoreply(10)
    await service.set_autoreply(10, True, actor_id=4)
    assert await service.is_autoreply(10)
    await service.set_autoreply(10, False, actor_id=4)
    await service.audit(4, "model.use", "tiny@2")
    async with service.db.session() as s:
        rows = await s.scalars(select(AuditEntry).order_by(AuditEntry.id))
        entries = [(a.actor_id, a.action, a.detail) for a in rows]
    assert entries == [
        (4, "autoreply.on", "channel 10"),
        (4, "autoreply.off", "channel 10"),
        (4, "model.use", "tiny@2"),
    ]
    assert not await service.is_autoreply(10)


async def test_autoreply_channels_are_read_from_the_database(db: Database, settings):
    first = ChatService(db, FakeEngine(), settings)
    await first.set_autoreply(10, True, actor_id=4)
    restarted = ChatService(db, FakeEngine(), settings)  # a new process: reads what is stored
    assert await restarted.is_autoreply(10) and not await restarted.is_autoreply(11)
    await restarted.set_autoreply(11, True, actor_id=4)
    await restarted.set_autoreply(10, False, actor_id=4)
    assert await restarted.is_autoreply(11) and not await restarted.is_autoreply(10)
    assert await ChatService(db, FakeEngine(), settings).is_autoreply(11)


async def test_the_reply_budget_never_takes_over_half_the_context(db: Database, settings):
    engine = FakeEngine(max_context=300)
    service = ChatService(db, engine, settings)
    assert (await service.get_settings(10)).max_new_tokens == 256  # the channel's own value
    await converse(service, message("hi"))
    assert engine.submitted[0][1].max_new_tokens == 150
    await service.update_settings(10, 1, max_tokens=20, top_p=0)
    await converse(service, message("again"))
    params = engine.submitted[1][1]
    assert params.max_new_tokens == 20
    assert (params.top_p, params.top_k) == (1.0, 1)  # top_p 0: only the likeliest token


async def test_a_model_without_chat_template_gets_a_plain_transcript(db: Database, settings):
    engine = FakeEngine(chat_template=None)
    service = ChatService(db, engine, settings)
    await service.set_persona(10, "Be kind.", actor_id=1)
    await converse(service, message("hi"))
    await converse(service, message("more", author=BOB))
    assert engine.prompt_text(1) == (
        f"System: Be kind.\nUser: alice: hi\nAssistant: {engine.reply_text}\nUser: bob: more\n"
        "Assistant:"
    )
    assert engine.submitted[1][1].stop == ("\nUser:", "\nSystem:")
    await service.clear_persona(10, actor_id=1)
    async with service.ask("a poem", channel_id=10, author=BOB) as reply:
        assert "".join([p async for p in reply]) == engine.reply_text
    assert engine.prompt_text(2) == "User: a poem\nAssistant:"


async def test_prompts_are_built_off_the_event_loop(service: ChatService, monkeypatch):
    """Tokenizing a long history takes seconds: it must not stall every other channel."""
    import threading

    threads: list[threading.Thread] = []
    build = ChatService._build

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(ChatService, "_build", staticmethod(recording))
    await converse(service, message("hello"))
    async with service.ask("one-off", channel_id=10, author=ALICE) as reply:
        [piece async for piece in reply]
    assert len(threads) == 2
    assert all(t is not threading.main_thread() for t in threads)


# ---- regenerate, continue, stop, history cut ----
async def _last_reply(service: ChatService, channel: int = 10) -> Message:
    return (await service.recent_messages(channel, 100))[-1]


async def test_regenerate_replaces_the_last_reply_with_a_new_sample_of_the_same_prompt(
    service: ChatService, engine: FakeEngine
):
    await service.update_settings(10, 1, seed=5)
    await converse(service, message("hello"), posted=[222])
    row = await _last_reply(service)
    async with service.regenerate(row.id, channel_id=10, bot=BOT) as reply:
        assert reply.row_id == row.id
        text = "".join([piece async for piece in reply])
    again = await service.recent_messages(10, 100)
    assert [m.id for m in again] == [row.id - 1, row.id]  # replaced, not added
    assert again[-1].content == text and again[-1].status == "complete"
    assert engine.submitted[1][0] == engine.submitted[0][0]  # the same prompt: its KV is kept
    assert engine.submitted[0][1].seed == 5 and engine.submitted[1][1].seed is None


async def test_only_the_last_reply_of_its_channel_can_be_taken_up_again(service: ChatService):
    await converse(service, message("one"))
    first = await _last_reply(service)
    await converse(service, message("two"))
    with pytest.raises(NotLatestReplyError):
        async with service.regenerate(first.id, channel_id=10, bot=BOT):
            pass
    last = await _last_reply(service)
    with pytest.raises(NotLatestReplyError):  # another channel's id
        async with service.regenerate(last.id, channel_id=11, bot=BOT):
            pass
    with pytest.raises(NotLatestReplyError) as refused:
        async with service.continue_reply(last.id, channel_id=10, bot=BOT):
            pass  # it ended by itself ("stop"): nothing to continue
    assert "cut off by its length" in refused.value.user_message
    assert (await _last_reply(service)).status == "complete"  # left as it was


async def test_continue_appends_to_a_reply_cut_by_max_tokens(db: Database, settings):
    engine = FakeEngine(reply_text="one two three four five six")
    service = ChatService(db, engine, settings)
    await service.update_settings(10, 1, max_tokens=7)
    await converse(service, message("count"))
    row = await _last_reply(service)
    assert (row.content, row.finish_reason) == ("one two", "length")
    engine.reply_text = " three"
    async with service.continue_reply(row.id, channel_id=10, bot=BOT) as reply:
        assert "".join([piece async for piece in reply]) == " three"
    longer = await _last_reply(service)
    assert longer.id == row.id and longer.content == "one two three"
    assert longer.token_count == row.token_count + len(b" three")
    prompt = engine.prompt_text(1)
    assert prompt.endswith("<|im_start|>assistant\none two")  # goes on inside the reply


async def test_stop_keeps_the_text_so_far_and_says_stopped(db: Database, settings):
    engine = FakeEngine(delay_s=0.01, reply_text="a b c d e f g h i j")
    service = ChatService(db, engine, settings)
    pieces = []
    async with service.reply(message("go"), bot=BOT) as reply:
        assert service.stop(reply.row_id + 1) is False  # no such reply streaming
        async for piece in reply:
            pieces.append(piece)
            if len(pieces) == 3:
                assert service.stop(reply.row_id)
    assert reply.stopped and "".join(pieces) == "a b c"
    row = await _last_reply(service)
    assert (row.status, row.finish_reason, row.content) == ("interrupted", "stopped", "a b c")
    assert service.stop(row.id) is False  # it has finished


async def test_the_history_cut_is_flagged_once_per_conversation(db: Database, settings):
    engine = FakeEngine(max_context=400, reply_text="ok")
    service = ChatService(db, engine, settings)
    await service.update_settings(10, 1, max_tokens=100)
    flags = []
    for i in range(12):
        async with service.reply(message(f"message number {i:02d}"), bot=BOT) as reply:
            [piece async for piece in reply]
        flags.append(reply.history_cut)
    assert flags.count(True) == 1 and reply.prompt.turns_dropped > 0
    first = flags.index(True)
    assert first > 0 and not any(flags[first + 1 :])
    await service.forget(10, 1)  # a new conversation may be told again
    for i in range(12):
        async with service.reply(message(f"again {i:02d}"), bot=BOT) as reply:
            [piece async for piece in reply]
        flags.append(reply.history_cut)
    assert flags.count(True) == 2
