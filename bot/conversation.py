"""Conversation logic shared by Discord and the console: turns, prompt budget, replies, settings."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from bot.engine import PromptTooLongError, QueueFullError, SamplingParams
from bot.storage import repo
from bot.storage.models import Message, Role, Status
from bot.storage.settings import (
    LIMITS,
    ChannelSettings,
    SettingsError,
    effective_settings,
    validate_changes,
)

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.engine import Engine, GenerationResult, LoadedModel
    from bot.storage.db import Database

__all__ = [
    "LIMITS",
    "BusyError",
    "ChannelSettings",
    "ChatService",
    "GenerationFailedError",
    "IncomingMessage",
    "MessageTooLongError",
    "Prompt",
    "Reply",
    "ReplyError",
    "SettingsError",
    "Speaker",
    "Turn",
    "build_prompt",
]

log = logging.getLogger(__name__)

HISTORY_LIMIT = 256  # newest turns read from the database before fitting them into the budget
# When a channel's history outgrows the prompt budget, cut it to this share of the budget: the
# following turns then extend the same prompt (whose KV the engine keeps) until the next cut,
# instead of every turn dropping one old turn and changing the prompt's beginning.
TRIM_TO = 0.6
PERSONA_MAX_CHARS = 4000
PARTIAL_FLUSH_S = 1.0  # how often a streaming reply's partial text is written to the database
PLAIN_STOP = ("\nUser:", "\nSystem:")  # where a plain-transcript reply ends


# ---- errors a user sees -------------------------------------------------------------------------
class ReplyError(Exception):
    """A reply that cannot be given; `user_message` is a short friendly line to show."""

    user_message = "Sorry, I couldn't answer that."

    def __init__(self, detail: str = "", user_message: str | None = None) -> None:
        super().__init__(detail or user_message or self.user_message)
        if user_message is not None:
            self.user_message = user_message


class BusyError(ReplyError):
    user_message = "I'm answering a lot of people right now; please try again in a moment."


class MessageTooLongError(ReplyError):
    user_message = "That message is too long for me to read; please shorten it."


class GenerationFailedError(ReplyError):
    user_message = "Sorry, something went wrong while I was answering. Please try again."


class ReplyCutError(ReplyError):
    """The engine ended the reply early: its time limit, or the bot shutting down. The text
    streamed so far stays (stored as interrupted); this note tells the reader it is partial."""

    NOTES: ClassVar[dict[str, str]] = {
        "timeout": "(cut off: this reply hit the time limit)",
        "cancelled": "(cut off: the bot is restarting)",
    }

    def __init__(self, finish_reason: str) -> None:
        super().__init__(f"reply ended by the engine: {finish_reason}", self.NOTES[finish_reason])


# ---- who said what ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speaker:
    id: int
    name: str
    is_bot: bool = False


@dataclass(frozen=True)
class IncomingMessage:
    channel_id: int
    guild_id: int | None
    author: Speaker
    content: str
    message_id: int | None = None
    is_dm: bool = False


@dataclass(frozen=True)
class Turn:
    """One stored turn as the prompt builder sees it."""

    role: str  # "user" or "assistant"
    content: str
    author_id: int | None = None
    author_name: str = ""
    row_id: int | None = None  # the stored message it comes from


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    turns_kept: int
    turns_dropped: int
    named: bool  # speakers named (multi-user channel)
    stop: tuple[str, ...] = ()  # stop strings the prompt format needs (plain transcripts)


# ---- prompt building ----------------------------------------------------------------------------
def speaker_label(name: str, author_id: int | None) -> str:
    """A name safe to put before a colon: one line, no colons, at most 32 characters."""
    label = re.sub(r"[\s:]+", " ", name).strip()[:32].strip()
    return label or f"user{author_id if author_id is not None else ''}"


def chat_messages(system: str | None, turns: Sequence[Turn], *, named: bool) -> list[dict]:
    """Turns as chat-template messages: system first, user turns named when `named`, a leading
    assistant turn dropped and consecutive turns of one role merged (templates that insist on
    user/assistant alternation accept the result)."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    seen_user = False
    for turn in turns:
        seen_user = seen_user or turn.role == Role.USER
        if turn.role not in (Role.USER, Role.ASSISTANT) or not seen_user:
            continue
        content = turn.content
        if named and turn.role == Role.USER:
            content = f"{speaker_label(turn.author_name, turn.author_id)}: {content}"
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": str(turn.role), "content": content})
    return messages


def build_prompt(
    turns: Sequence[Turn],
    *,
    system: str | None,
    render: Callable[[list[dict]], str],
    encode: Callable[[str], list[int]],
    budget: int,
    keep: int | None = None,
    trim_to: float = 1.0,
) -> Prompt:
    """The system prompt plus the newest turns whose rendered prompt fits in `budget` tokens.

    The last turn (the message being answered) must fit; older turns are dropped oldest first.
    `keep`: the newest turns to use if they fit (where the conversation's previous prompt
    started), so consecutive prompts begin alike. When turns must be dropped, the prompt is cut
    to fit `trim_to` x budget, which leaves room for the next turns before the next cut.
    MessageTooLongError when even the last turn alone does not fit.
    """
    if not turns:
        raise ValueError("build_prompt needs at least the turn being answered")
    named = len({t.author_id for t in turns if t.role == Role.USER}) > 1

    def attempt(count: int) -> tuple[str, list[int]]:
        text = render(chat_messages(system, turns[len(turns) - count :], named=named))
        return text, encode(text)

    first = keep if keep is not None and 0 < keep <= len(turns) else len(turns)
    text, ids = attempt(first)  # the window or everything: the common case is one render
    if len(ids) <= budget:
        return Prompt(text, ids, first, len(turns) - first, named)
    text, ids = attempt(1)  # `first` turns do not fit, so no more than first - 1 can
    if len(ids) > budget:
        raise MessageTooLongError(
            f"prompt of {len(ids)} tokens with only the newest turn exceeds the budget {budget}",
            f"That message is too long for me to read ({len(ids)} tokens with my instructions; "
            f"the limit is {budget}). Please shorten it.",
        )
    target = max(int(budget * trim_to), len(ids))
    low, high = 1, max(1, first - 1)  # low always fits; find the largest count that fits
    best = (text, ids)
    while low < high:
        mid = (low + high + 1) // 2
        candidate = attempt(mid)
        if len(candidate[1]) <= target:
            low, best = mid, candidate
        else:
            high = mid - 1
    return Prompt(best[0], best[1], low, len(turns) - low, named)


def plain_transcript(messages: list[dict]) -> str:
    """A conversation for a model without a chat template: "Role: text" lines, then "Assistant:"."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def sampling_params(s: ChannelSettings, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Channel settings in the engine's terms (top_p 0, its limit, keeps only the top token)."""
    return SamplingParams(
        stop=stop,
        temperature=s.temperature,
        top_p=s.top_p if s.top_p > 0 else 1.0,
        top_k=s.top_k if s.top_p > 0 else 1,
        max_new_tokens=s.max_tokens,
        repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram,
        seed=s.seed,
    )


def generation_settings(model: LoadedModel, overrides: dict[str, Any]) -> ChannelSettings:
    """A channel's settings for one request: the reply budget never takes over half the context."""
    settings = effective_settings(model.manifest.generation, overrides)
    cap = max(1, model.max_context // 2)
    return settings.model_copy(update={"max_tokens": min(settings.max_tokens, cap)})


def encode(model: LoadedModel, text: str) -> list[int]:
    """Token ids of text as it appears in a rendered prompt (no BOS/EOS added)."""
    return model.encode(text, add_special_tokens=False)


def default_system(model: LoadedModel) -> str | None:
    """The model's own system prompt if its manifest names one (else the template's default)."""
    value = model.manifest.generation.get("system_prompt")
    return value if isinstance(value, str) and value.strip() else None


# ---- one reply ----------------------------------------------------------------------------------
class _ChannelQueues:
    """One FIFO lock per channel (asyncio.Lock wakes waiters in arrival order); idle ones go."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, channel_id: int) -> None:
        lock, users = self._locks.get(channel_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[channel_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._drop(channel_id)
            raise

    def release(self, channel_id: int) -> None:
        self._locks[channel_id][0].release()
        self._drop(channel_id)

    def _drop(self, channel_id: int) -> None:
        lock, users = self._locks[channel_id]
        if users <= 1:
            del self._locks[channel_id]
        else:
            self._locks[channel_id] = (lock, users - 1)


@dataclass
class _Started:
    stream: Any  # the engine's stream: async iterator of str, .result, .cancel()
    row_id: int | None  # the assistant row (None: nothing stored, as for ask())
    prompt: Prompt


class Reply:
    """`async with service.reply(msg, bot=me) as reply: async for piece in reply: ...`

    Entering waits for the channel's turn and submits to the engine (ReplyError if it cannot);
    iterating yields text pieces; leaving stores the outcome (cancelling an unfinished stream).
    """

    def __init__(
        self,
        db: Database,
        start: Callable[[], Awaitable[_Started]],
        *,
        channel_id: int,
        queues: _ChannelQueues | None,
    ) -> None:
        self._db = db
        self._start = start
        self._channel_id = channel_id
        self._queues = queues
        self._started: _Started | None = None
        self._finished = False  # the stream ended by itself
        self._failed = False
        self._last_flush = 0.0
        self._t0 = 0.0
        self.message_ids: list[int] = []
        self.result: GenerationResult | None = None
        self.text = ""

    @property
    def prompt(self) -> Prompt | None:
        return self._started.prompt if self._started else None

    async def __aenter__(self) -> Reply:
        if self._queues is not None:
            await self._queues.acquire(self._channel_id)
        try:
            self._t0 = time.monotonic()
            self._started = await self._start()
            self._last_flush = time.monotonic()
        except BaseException:
            self._release()
            raise
        return self

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._started is None:
            raise RuntimeError("iterate a Reply inside `async with`")
        stream = self._started.stream
        try:
            async for piece in stream:
                self.text += piece
                yield piece
                if time.monotonic() - self._last_flush >= PARTIAL_FLUSH_S:
                    await self._flush_partial()
        except ReplyError:
            self._failed = True
            raise
        except Exception as exc:
            self._failed = True
            log.exception("generation failed in channel %s", self._channel_id)
            raise GenerationFailedError(str(exc)) from exc
        self._finished = True
        self.result = stream.result
        reason = self.result.finish_reason if self.result is not None else None
        if reason == "error":
            self._failed = True
            raise GenerationFailedError("the engine ended the reply with an error")
        if reason in ReplyCutError.NOTES:
            raise ReplyCutError(reason)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._started is not None:
                if not self._finished:
                    self._started.stream.cancel()
                    self.result = self._started.stream.result
                if self._started.row_id is not None:
                    await asyncio.shield(self._store_final())
        finally:
            self._release()

    def _release(self) -> None:
        if self._queues is not None:
            self._queues.release(self._channel_id)
            self._queues = None

    async def _flush_partial(self) -> None:
        if self._started is None or self._started.row_id is None:
            return
        self._last_flush = time.monotonic()
        async with self._db.session() as s, s.begin():
            await repo.update_message(
                s, self._started.row_id, content=self.text, discord_message_ids=self.message_ids
            )

    async def _store_final(self) -> None:
        assert self._started is not None and self._started.row_id is not None
        result = self.result
        cut = result is not None and result.finish_reason in ReplyCutError.NOTES
        complete = self._finished and not self._failed and not cut
        fields: dict[str, Any] = {
            "content": result.text if complete and result is not None else self.text,
            "status": Status.COMPLETE if complete else Status.INTERRUPTED,
            "finish_reason": result.finish_reason if result is not None else "cancelled",
            "discord_message_ids": self.message_ids,
            "duration_ms": (time.monotonic() - self._t0) * 1000.0,
        }
        if self._failed:
            fields["finish_reason"] = "error"
        elif not complete and fields["finish_reason"] in (None, "stop", "length"):
            fields["finish_reason"] = "cancelled"
        if result is not None:
            if result.model:  # the version that actually produced it
                fields["model_version"] = result.model
            fields.update(
                token_count=result.completion_tokens,
                queue_ms=result.queue_ms,
                ttft_ms=result.ttft_ms,
                tokens_per_s=result.tokens_per_s,
            )
        async with self._db.session() as s, s.begin():
            await repo.update_message(s, self._started.row_id, **fields)


# ---- the service --------------------------------------------------------------------------------
class ChatService:
    """Everything the Discord cogs and the console do with conversations, one unit of work each.

    `forget` keeps the rows in the database (marked forgotten) and leaves them out of prompts.
    `ask` uses the channel's sampling settings but neither its persona nor its history.
    """

    def __init__(self, db: Database, engine: Engine, settings: Settings) -> None:
        self.db = db
        self.engine = engine
        self.settings = settings
        self._queues = _ChannelQueues()
        # channel -> first stored message of its last prompt (where the next prompt starts too)
        self._window: dict[int, int | None] = {}
        # auto-reply channels, read once: the chat cog asks for every message in every guild
        self._autoreply: set[int] | None = None

    # -- replies --
    def reply(self, msg: IncomingMessage, *, bot: Speaker) -> Reply:
        async def start() -> _Started:
            return await self._start_reply(msg, bot)

        return Reply(self.db, start, channel_id=msg.channel_id, queues=self._queues)

    def ask(self, prompt: str, *, channel_id: int, author: Speaker) -> Reply:
        async def start() -> _Started:
            model = self.engine.model  # one version for the whole request, even during a swap
            async with self.db.session() as s:
                overrides = await repo.settings_overrides(s, channel_id)
            settings = generation_settings(model, overrides)
            turns = [Turn(Role.USER, prompt, author.id, author.name)]
            built = self._build(model, turns, system=default_system(model), settings=settings)
            stream = self._submit(built, settings)
            return _Started(stream, None, built)

        return Reply(self.db, start, channel_id=channel_id, queues=None)

    async def _start_reply(self, msg: IncomingMessage, bot: Speaker) -> _Started:
        model = self.engine.model  # one version for the whole request, even during a swap
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, msg.channel_id, msg.guild_id)
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
            rows = await repo.history(s, msg.channel_id, HISTORY_LIMIT)
            overrides = await repo.settings_overrides(s, msg.channel_id)
        settings = generation_settings(model, overrides)
        turns = [_turn(row, bot) for row in rows if row.content or row.role == Role.USER]
        system = persona or default_system(model)
        start = self._window.get(msg.channel_id)
        ids = [t.row_id for t in turns]
        keep = len(turns) - ids.index(start) if start in ids else None
        built = self._build(model, turns, system=system, settings=settings, keep=keep)
        self._window[msg.channel_id] = turns[len(turns) - built.turns_kept].row_id
        stream = self._submit(built, settings)
        try:
            async with self.db.session() as s, s.begin():
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
        return _Started(stream, row.id, built)

    @staticmethod
    def _build(
        model: LoadedModel,
        turns: list[Turn],
        *,
        system: str | None,
        settings: ChannelSettings,
        keep: int | None = None,
    ) -> Prompt:
        templated = bool(model.manifest.tokenizer.chat_template)
        render = (
            (lambda messages: model.render_chat(messages, add_generation_prompt=True))
            if templated
            else plain_transcript
        )
        try:
            prompt = build_prompt(
                turns,
                system=system,
                render=render,
                encode=lambda text: encode(model, text),
                budget=model.max_context - settings.max_tokens,
                keep=keep,
                trim_to=TRIM_TO,
            )
            return prompt if templated else replace(prompt, stop=PLAIN_STOP)
        except ReplyError:
            raise
        except Exception as exc:  # a template that refuses the conversation, no template, ...
            log.exception("cannot build a prompt for %s", model.ref)
            raise GenerationFailedError(str(exc)) from exc

    def _submit(self, prompt: Prompt, settings: ChannelSettings) -> Any:
        try:
            return self.engine.submit(
                prompt.ids,
                sampling_params(settings, prompt.stop),
                timeout_s=self.settings.request_timeout_s,
            )
        except QueueFullError as exc:
            raise BusyError(str(exc)) from exc
        except PromptTooLongError as exc:
            raise MessageTooLongError(str(exc)) from exc
        except Exception as exc:
            log.exception("the engine refused a request")
            raise GenerationFailedError(str(exc)) from exc

    # -- settings --
    async def get_settings(self, channel_id: int) -> ChannelSettings:
        async with self.db.session() as s:
            overrides = await repo.settings_overrides(s, channel_id)
        return effective_settings(self.engine.model.manifest.generation, overrides)

    async def update_settings(
        self, channel_id: int, actor_id: int, **changes: Any
    ) -> ChannelSettings:
        values = validate_changes(changes)
        detail = ", ".join(f"{k}={v}" for k, v in values.items())
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_overrides(s, channel_id, actor_id, values)
            await repo.add_audit(s, actor_id, "settings.set", f"channel {channel_id}: {detail}")
        return await self.get_settings(channel_id)

    async def reset_settings(self, channel_id: int, actor_id: int) -> ChannelSettings:
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
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
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_channel_fields(s, channel_id, persona=text)
            await repo.add_audit(s, actor_id, "persona.set", f"channel {channel_id}: {text[:200]}")
        return text

    async def clear_persona(self, channel_id: int, actor_id: int) -> None:
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_channel_fields(s, channel_id, persona=None)
            await repo.add_audit(s, actor_id, "persona.clear", f"channel {channel_id}")

    # -- memory, auto-reply, audit --
    async def forget(self, channel_id: int, actor_id: int) -> int:
        """Turns taken out of the channel's memory; they stay in the database, marked forgotten."""
        async with self.db.session() as s, s.begin():
            count = await repo.forget(s, channel_id)
            await repo.add_audit(s, actor_id, "forget", f"channel {channel_id}: {count} turns")
        return count

    async def set_autoreply(self, channel_id: int, enabled: bool, actor_id: int) -> None:
        async with self.db.session() as s, s.begin():
            await repo.ensure_channel(s, channel_id)
            await repo.set_channel_fields(s, channel_id, autoreply=bool(enabled))
            state = "on" if enabled else "off"
            await repo.add_audit(s, actor_id, f"autoreply.{state}", f"channel {channel_id}")
        if self._autoreply is not None:
            (self._autoreply.add if enabled else self._autoreply.discard)(channel_id)

    async def is_autoreply(self, channel_id: int) -> bool:
        if self._autoreply is None:
            async with self.db.session() as s:
                self._autoreply = await repo.autoreply_channels(s)
        return channel_id in self._autoreply

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
