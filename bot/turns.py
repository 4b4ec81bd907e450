"""Value types of a conversation: who speaks, an incoming message, a stored turn, a built prompt."""

from __future__ import annotations

from dataclasses import dataclass


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
    thinks: bool = False  # the reply may begin with a <think> block (kept apart: bot/thinking.py)
