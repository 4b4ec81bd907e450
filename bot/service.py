"""ChatService: every conversation operation of the cogs and the console, one unit of work each."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bot.access import AccessService
from bot.engine import EngineClosedError, EngineError, PromptTooLongError, QueueFullError
from bot.errors import (
    BusyError,
    GenerationFailedError,
    MessageTooLongError,
    NotLatestReplyError,
    ReplyError,
    RestartingError,
    WithdrawnError,
)
from bot.generation import (
    SETTINGS,
    ChannelSettings,
    SettingsError,
    effective_settings,
    generation_settings,
    sampling_params,
    validate_changes,
)
from bot.privacy import PrivacyService
from bot.prompt import (
    PLAIN_STOP,
    TRIM_TO,
    build_prompt,
    default_system,
    encode,
    encode_continuation,
    encode_messages,
)
from bot.reply import ChannelQueues, Reply, Started
from bot.storage import repo
from bot.storage.models import Message, PendingMessage, Role, Status
from bot.thinking import ThinkingStream, opens_thinking
from bot.turns import IncomingMessage, Prompt, Speaker, Turn

if TYPE_CHECKING:
    from bot.backends import GenerationBackend
    from bot.config import BotConfig
    from bot.engine import LoadedModel
    from bot.storage.db import Database

log = logging.getLogger(__name__)

HISTORY_LIMIT = 256  # newest turns read from the database before fitting them into the budget
PERSONA_MAX_CHARS = 4000


def persona_token_limit(max_context: int, max_tokens: int) -> int:
    """The most tokens a persona may take: half of a prompt's budget (the context less the
    reply's room), so that a real conversation still fits beside it."""
    return max(0, (max_context - max_tokens) // 2)


# ---- the service --------------------------------------------------------------------------------
class ChatService:
    """Everything the Discord cogs and the console do with conversations, one unit of work each.

    `forget` keeps the rows in the database (marked forgotten) and leaves them out of prompts.
    `ask` uses the channel's sampling settings but neither its persona nor its history.
    """

    def __init__(self, db: Database, backend: GenerationBackend, settings: BotConfig) -> None:
        self.db = db
        self.backend = backend  # the in-process engine, or Redis workers (bot.backends)
        self.settings = settings
        self._queues = ChannelQueues()
        # channel -> first stored message of its last prompt (where the next prompt starts too)
        self._window: dict[int, int | None] = {}
        self.access = AccessService(db)  # who may talk where, who may change settings
        self.privacy = PrivacyService(db)  # opt-outs, forget-me, export, retention
        self._live: dict[int, Reply] = {}  # assistant row id -> its reply, while it streams

    # -- replies --
    def reply(self, msg: IncomingMessage, *, bot: Speaker, pending_id: int | None = None) -> Reply:
        """One reply to `msg`. Entering stores the message in the inbox at once (or takes the
        inbox row `pending_id`, for a message accepted before a restart), then waits for the
        channel's turn, when the message moves into the history and the reply starts.
        An opted-out author's message is stored nowhere: it is answered from itself alone."""
        accepted: list[int] = [] if pending_id is None else [pending_id]
        unstored: list[bool] = []
        held: list[int] = []  # the "in line" placeholder, which may come before the inbox row

        async def accept() -> None:
            if await self.privacy.opted_out(msg.author.id):
                unstored.append(True)
                return
            shown = held[-1] if held else None  # a placeholder shown first goes in with the row
            accepted.append(await self.accept(msg, held=shown))
            if held and held[-1] != shown:  # shown while the row was being written
                await remember(held[-1])

        async def start() -> Started:
            if unstored or await self.privacy.opted_out(msg.author.id):
                if accepted:  # opted out while the message waited (or across a restart)
                    await self.decline(accepted[0])
                return await self._start_unstored(msg)
            return await self._start_reply(msg, bot, accepted[0] if accepted else None)

        async def decline() -> None:
            if accepted:
                await self.decline(accepted[0])

        async def hold(message_id: int) -> None:
            held.append(message_id)
            if accepted:
                await remember(message_id)

        async def remember(message_id: int) -> None:
            async with self.db.session() as s, s.begin():
                await repo.hold_pending(s, accepted[0], message_id)

        return Reply(
            self.db,
            start,
            channel_id=msg.channel_id,
            queues=self._queues,
            accept=accept if pending_id is None else None,
            decline=decline,
            hold=hold,
            closed=lambda: bool(getattr(self.backend, "closed", False)),
            live=self._live,
        )

    async def accept(self, msg: IncomingMessage, held: int | None = None) -> int:
        """Store an accepted message in the inbox before anything else can fail (with the id of
        the placeholder `held` already shown for it); its id."""
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, msg.channel_id, msg.guild_id)
            pending = await repo.add_pending(
                s,
                channel_id=msg.channel_id,
                author_id=msg.author.id,
                author_name=msg.author.name,
                content=msg.content,
                discord_message_id=msg.message_id,
                held_message_id=held,
            )
        return pending.id

    async def pending(self) -> list[PendingMessage]:
        """Messages accepted and never answered (left by a crash), oldest first."""
        async with self.db.session() as s:
            return await repo.pending_messages(s)

    async def decline(self, pending_id: int) -> None:
        """Drop an accepted message from the inbox (its author was told to ask again)."""
        async with self.db.session() as s, s.begin():
            await repo.take_pending(s, pending_id)

    def ask(self, prompt: str, *, channel_id: int, author: Speaker) -> Reply:
        async def start() -> Started:
            model = await self._pinned()  # one version for the whole request, even in a swap
            async with self.db.session() as s:
                overrides = await repo.settings_overrides(s, channel_id)
            settings = generation_settings(model, overrides)
            turns = [Turn(Role.USER, prompt, author.id, author.name)]
            built = await asyncio.to_thread(
                self._build,
                model,
                turns,
                system=default_system(model),
                settings=settings,
                thinking=self.settings.thinking,
            )
            stream = await self._submit(built, settings)
            return Started(stream, None, built)

        return Reply(self.db, start, channel_id=channel_id, queues=None)

    async def _start_unstored(self, msg: IncomingMessage) -> Started:
        """A reply to an opted-out user: the channel's persona and settings, the live message
        alone as the conversation, nothing stored."""
        model = await self._pinned()
        async with self.db.session() as s:
            channel = await repo.get_channel(s, msg.channel_id)
            overrides = await repo.settings_overrides(s, msg.channel_id)
        settings = generation_settings(model, overrides)
        turns = [Turn(Role.USER, msg.content, msg.author.id, msg.author.name)]
        system = (channel.persona if channel else None) or default_system(model)
        built = await asyncio.to_thread(
            self._build,
            model,
            turns,
            system=system,
            settings=settings,
            thinking=self.settings.thinking,
        )
        return Started(await self._submit(built, settings), None, built)

    async def _start_reply(
        self, msg: IncomingMessage, bot: Speaker, pending_id: int | None
    ) -> Started:
        model = await self._pinned()  # one version for the whole request, even in a swap
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, msg.channel_id, msg.guild_id)
            # moves from the inbox into the history; gone from it (forget-me deleted it while it
            # waited): withdrawn, neither stored nor answered
            if pending_id is not None and not await repo.take_pending(s, pending_id):
                raise WithdrawnError(f"inbox row {pending_id} was deleted before its turn")
            await repo.add_message(
                s,
                channel_id=msg.channel_id,
                discord_message_id=msg.message_id,
                author_id=msg.author.id,
                author_name=msg.author.name,
                role=Role.USER,
                content=msg.content,
                token_count=len(encode(model, msg.content)),
                status=Status.COMPLETE,
            )
            channel = await repo.get_channel(s, msg.channel_id)
            persona = channel.persona if channel else None
            noted = bool(channel and channel.history_cut_noted)
            rows = await repo.history(s, msg.channel_id, HISTORY_LIMIT)
            overrides = await repo.settings_overrides(s, msg.channel_id)
        settings = generation_settings(model, overrides)
        turns = [_turn(row, bot) for row in rows if row.content or row.role == Role.USER]
        system = persona or default_system(model)
        keep = self._window_turns(msg.channel_id, turns)
        try:
            # tokenizing up to HISTORY_LIMIT turns takes long: off the event loop
            built = await asyncio.to_thread(
                self._build,
                model,
                turns,
                system=system,
                settings=settings,
                keep=keep,
                thinking=self.settings.thinking,
            )
            self._window[msg.channel_id] = turns[len(turns) - built.turns_kept].row_id
            stream = await self._submit(built, settings)
        except MessageTooLongError:  # refused: the message does not stay as a turn
            async with self.db.session() as s, s.begin():
                await repo.delete_messages(s, [rows[-1].id])  # the one just stored
            raise
        history_cut = bool(built.turns_dropped) and not noted
        try:
            async with self.db.session() as s, s.begin():
                if history_cut:  # said once per conversation: remembered with the channel
                    await repo.set_history_cut_noted(s, msg.channel_id, True)
                row = await repo.add_message(
                    s,
                    channel_id=msg.channel_id,
                    author_id=bot.id,
                    author_name=bot.name,
                    role=Role.ASSISTANT,
                    content="",
                    prompt_tokens=len(built.ids),
                    model_version=model.ref,
                    status=Status.IN_PROGRESS,
                )
        except BaseException:
            stream.cancel()
            raise
        return Started(stream, row.id, built, history_cut=history_cut)

    # -- regenerate, continue, stop --
    def regenerate(self, row_id: int, *, channel_id: int, bot: Speaker) -> Reply:
        """A new sample in place of the channel's last reply (`row_id`): the same prompt (whose
        KV the engine kept), a fresh seed; the stored row's content is replaced."""
        return self._again(row_id, channel_id, bot, extend=False)

    def continue_reply(self, row_id: int, *, channel_id: int, bot: Speaker) -> Reply:
        """More of the channel's last reply (`row_id`, cut by max_tokens): the prompt ends
        inside the reply, and what is generated is appended to the stored row."""
        return self._again(row_id, channel_id, bot, extend=True)

    def _again(self, row_id: int, channel_id: int, bot: Speaker, *, extend: bool) -> Reply:
        async def start() -> Started:
            return await self._restart_reply(row_id, channel_id, bot, extend=extend)

        return Reply(
            self.db,
            start,
            channel_id=channel_id,
            queues=self._queues,
            closed=lambda: bool(getattr(self.backend, "closed", False)),
            live=self._live,
        )

    async def _restart_reply(
        self, row_id: int, channel_id: int, bot: Speaker, *, extend: bool
    ) -> Started:
        model = await self._pinned()
        async with self.db.session() as s, s.begin():
            row = await repo.get_message(s, row_id)
            if row is None or row.role != Role.ASSISTANT or row.forgotten:
                raise NotLatestReplyError(f"no reply {row_id} to take up again")
            if row.channel_id != channel_id:
                raise NotLatestReplyError(f"reply {row_id} is not in channel {channel_id}")
            rows = await repo.history(s, row.channel_id, HISTORY_LIMIT)
            if not rows or rows[-1].id != row_id:
                raise NotLatestReplyError(f"reply {row_id} is not its channel's last")
            if extend and row.finish_reason != "length":
                raise NotLatestReplyError(
                    f"reply {row_id} was not cut by max_tokens",
                    "Only a reply cut off by its length can be continued.",
                )
            channel = await repo.get_channel(s, row.channel_id)
            persona = channel.persona if channel else None
            overrides = await repo.settings_overrides(s, row.channel_id)
            status, content, tokens = row.status, row.content, row.token_count or 0
            await repo.update_message(s, row_id, status=Status.IN_PROGRESS)
        settings = generation_settings(model, overrides)
        if not extend:
            settings = settings.model_copy(update={"seed": None})  # a new sample, not the same
        turns = [_turn(r, bot) for r in rows if r.content or r.role == Role.USER]
        if not extend:
            turns = turns[:-1]
        system = persona or default_system(model)
        keep = self._window_turns(row.channel_id, turns)
        try:
            built = await asyncio.to_thread(
                self._build,
                model,
                turns,
                system=system,
                settings=settings,
                keep=keep,
                extend=extend,
                thinking=self.settings.thinking,
            )
            stream = await self._submit(built, settings)
        except BaseException:
            async with self.db.session() as s, s.begin():
                await repo.update_message(s, row_id, status=status)  # left as it was
            raise
        if not extend:
            return Started(stream, row_id, built)
        return Started(stream, row_id, built, prefix=content, prefix_tokens=tokens)

    def stop(self, row_id: int) -> bool:
        """Stop the reply stored as `row_id` if it is streaming; False if it is not."""
        reply = self._live.get(row_id)
        if reply is None:
            return False
        reply.stop()
        return True

    async def reply_info(self, row_id: int) -> tuple[Message, int | None, Message | None] | None:
        """(the assistant row, who asked for it, the channel's reply before it), or None."""
        async with self.db.session() as s:
            row = await repo.get_message(s, row_id)
            if row is None or row.role != Role.ASSISTANT:
                return None
            return row, await repo.asker_of(s, row), await repo.previous_reply(s, row)

    @staticmethod
    def _build(
        model: LoadedModel,
        turns: list[Turn],
        *,
        system: str | None,
        settings: ChannelSettings,
        keep: int | None = None,
        extend: bool = False,
        thinking: str = "auto",
    ) -> Prompt:
        templated = bool(model.manifest.tokenizer.chat_template)
        encoder = encode_continuation if extend else encode_messages
        try:
            prompt = build_prompt(
                turns,
                system=system,
                encode_chat=lambda messages: encoder(model, messages, thinking),
                budget=model.max_context - settings.max_new_tokens,
                keep=keep,
                trim_to=TRIM_TO,
            )
            prompt = replace(prompt, thinks=model.thinks and not extend)
            return prompt if templated else replace(prompt, stop=PLAIN_STOP)
        except ReplyError:
            raise
        except Exception as exc:  # a template that refuses the conversation, no template, ...
            log.exception("cannot build a prompt for %s", model.ref)
            raise GenerationFailedError(str(exc)) from exc

    def _window_turns(self, channel_id: int, turns: list[Turn]) -> int | None:
        """How many of the newest turns the channel's previous prompt started with (None: its
        first turn is gone), so consecutive prompts begin alike and the engine's KV is reused."""
        start = self._window.get(channel_id)
        ids = [t.row_id for t in turns]
        return len(turns) - ids.index(start) if start in ids else None

    async def _pinned(self) -> LoadedModel:
        """The version new requests are pinned to now: with Redis another shard may have moved
        the pin, and a prompt built for the old one would send the workers back to it. If the
        pin cannot be read, the version this process has (submit then says what is wrong)."""
        try:
            return await self.backend.refresh()
        except EngineError as exc:
            log.warning("cannot check the pinned model version: %s", exc)
            return self.backend.model

    async def _submit(self, prompt: Prompt, settings: ChannelSettings) -> Any:
        try:
            stream = await self.backend.submit(
                prompt.ids,
                sampling_params(settings, prompt.stop),
                timeout_s=self.settings.request_timeout_s,
            )
            if prompt.thinks:  # its <think> block is neither shown as the reply nor stored
                return ThinkingStream(stream, inside=opens_thinking(prompt.text))
            return stream
        except QueueFullError as exc:
            raise BusyError(str(exc)) from exc
        except EngineClosedError as exc:
            raise RestartingError(str(exc)) from exc
        except PromptTooLongError as exc:
            raise MessageTooLongError(str(exc)) from exc
        except Exception as exc:
            log.exception("the engine refused a request")
            raise GenerationFailedError(str(exc)) from exc

    # -- settings --
    async def get_settings(self, channel_id: int, guild_id: int | None = None) -> ChannelSettings:
        async with self.db.session() as s:
            server, own = await repo.settings_layers(s, channel_id, guild_id)
        return effective_settings(self.backend.model.manifest.generation, own, server)

    async def get_server_settings(self, guild_id: int) -> ChannelSettings:
        """A server's defaults for its channels (marked as set here) over the model's."""
        async with self.db.session() as s:
            row = await repo.guild_settings(s, guild_id)
        values = {key: getattr(row, key) if row else None for key in SETTINGS}
        return effective_settings(self.backend.model.manifest.generation, values)

    async def update_server_settings(
        self, guild_id: int, actor_id: int, **changes: Any
    ) -> ChannelSettings:
        values = validate_changes(changes)
        detail = ", ".join(f"{k}={v}" for k, v in values.items())
        async with self.db.session() as s, s.begin():
            await repo.set_guild_overrides(s, guild_id, actor_id, values)
            await repo.add_audit(s, actor_id, "settings.set", f"guild {guild_id}: {detail}")
        return await self.get_server_settings(guild_id)

    async def reset_server_settings(self, guild_id: int, actor_id: int) -> ChannelSettings:
        async with self.db.session() as s, s.begin():
            await repo.set_guild_overrides(s, guild_id, actor_id, dict.fromkeys(SETTINGS))
            await repo.add_audit(s, actor_id, "settings.reset", f"guild {guild_id}")
        return await self.get_server_settings(guild_id)

    async def update_settings(
        self, channel_id: int, actor_id: int, *, guild_id: int | None = None, **changes: Any
    ) -> ChannelSettings:
        """Set a channel's own values (`guild_id`: its server, so its defaults apply)."""
        values = validate_changes(changes)
        detail = ", ".join(f"{k}={v}" for k, v in values.items())
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id, guild_id)
            await repo.set_overrides(s, channel_id, actor_id, values)
            await repo.add_audit(s, actor_id, "settings.set", f"channel {channel_id}: {detail}")
        return await self.get_settings(channel_id)

    async def reset_settings(
        self, channel_id: int, actor_id: int, *, guild_id: int | None = None
    ) -> ChannelSettings:
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id, guild_id)
            await repo.clear_overrides(s, channel_id, actor_id)
            await repo.add_audit(s, actor_id, "settings.reset", f"channel {channel_id}")
        return await self.get_settings(channel_id)

    # -- persona --
    async def get_persona(self, channel_id: int) -> str | None:
        async with self.db.session() as s:
            channel = await repo.get_channel(s, channel_id)
        return channel.persona if channel else None

    async def set_persona(self, channel_id: int, text: str, actor_id: int) -> str:
        text = text.strip()
        if not text:
            raise SettingsError("the persona is empty; to remove it, clear it instead")
        if len(text) > PERSONA_MAX_CHARS:
            raise SettingsError(
                f"the persona is too long ({len(text)} characters; at most {PERSONA_MAX_CHARS})"
            )
        model = self.backend.model
        async with self.db.session() as s, s.begin():
            overrides = await repo.settings_overrides(s, channel_id)
            settings = generation_settings(model, overrides)
            tokens = len(encode(model, text))
            limit = persona_token_limit(model.max_context, settings.max_new_tokens)
            if tokens > limit:
                raise SettingsError(
                    f"the persona is too long for {model.ref}: {tokens} tokens, at most {limit} "
                    "(half of what a prompt may hold, so the conversation keeps the other half)"
                )
            await repo.ensure_channel(s, channel_id)
            await repo.set_persona(s, channel_id, text)
            await repo.add_audit(s, actor_id, "persona.set", f"channel {channel_id}: {text[:200]}")
        return text

    async def clear_persona(self, channel_id: int, actor_id: int) -> None:
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_persona(s, channel_id, None)
            await repo.add_audit(s, actor_id, "persona.clear", f"channel {channel_id}")

    # -- memory, auto-reply, audit --
    async def forget(self, channel_id: int, actor_id: int) -> int:
        """Turns taken out of the channel's memory; they stay in the database, marked forgotten."""
        async with self.db.session() as s, s.begin():
            count = await repo.forget(s, channel_id)
            await repo.set_history_cut_noted(s, channel_id, False)
            await repo.add_audit(s, actor_id, "forget", f"channel {channel_id}: {count} turns")
        return count

    async def set_autoreply(
        self, channel_id: int, enabled: bool, actor_id: int, *, threads: bool = False
    ) -> None:
        """Answer every message of the channel (`threads`: each answer in a new thread)."""
        threads = bool(enabled and threads)
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_autoreply(s, channel_id, bool(enabled), threads=threads)
            state = ("threads" if threads else "on") if enabled else "off"
            await repo.add_audit(s, actor_id, f"autoreply.{state}", f"channel {channel_id}")

    async def replies_in_threads(self, channel_id: int) -> bool:
        """Whether answers to this channel's messages go into a new thread each (read from the
        database: a change made through another shard process applies at once)."""
        async with self.db.session() as s:
            channel = await repo.get_channel(s, channel_id)
        return bool(channel is not None and channel.thread_replies)

    async def adopt_thread(self, thread_id: int, guild_id: int | None) -> None:
        """A thread the bot started for a conversation: it answers every message there."""
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, thread_id, guild_id)
            await repo.set_autoreply(s, thread_id, True)

    async def is_autoreply(self, channel_id: int) -> bool:
        """Whether the bot answers every message of the channel (read from the database, as
        `replies_in_threads`)."""
        async with self.db.session() as s:
            channel = await repo.get_channel(s, channel_id)
        return bool(channel is not None and channel.autoreply)

    async def audit(self, actor_id: int, action: str, detail: str) -> None:
        async with self.db.session() as s, s.begin():
            await repo.add_audit(s, actor_id, action, detail)

    async def recent_messages(
        self, channel_id: int, limit: int = 20, *, include_forgotten: bool = False
    ) -> list[Message]:
        """The newest stored turns of a channel, oldest first (in-progress replies left out)."""
        async with self.db.session() as s:
            return await repo.history(s, channel_id, limit, include_forgotten=include_forgotten)


def _turn(row: Message, bot: Speaker) -> Turn:
    """A stored row as a prompt turn: the bot's own turns are the assistant's."""
    role = Role.ASSISTANT if row.role == Role.ASSISTANT or row.author_id == bot.id else Role.USER
    return Turn(role, row.content, row.author_id, row.author_name, row.id)
