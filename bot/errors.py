"""Errors a user sees: each reply that cannot be given carries a short friendly line."""

from __future__ import annotations

from typing import ClassVar

QUOTE_CHARS = 80  # at most this much of what a user typed is quoted back in a reply
MESSAGE_CHARS = 2000  # the longest message Discord accepts


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """What a user typed, quoted for a reply and cut to `limit` characters: every reply that
    quotes user input goes through this (a quote may be any size; Discord takes 2,000)."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: max(limit - 4, 1)] + "...'"


def fitted(text: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole reply cut to what Discord accepts (the last net: a reply Discord refuses is no
    answer at all)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


class RestartingError(ReplyError):
    """The bot is shutting down before this message's turn came; nothing was generated."""

    user_message = "I'm restarting; please ask again in a moment."


class WithdrawnError(ReplyError):
    """The message left the inbox before its turn (its author's forget-me deleted it): it is
    neither stored nor answered, and nothing is said (`user_message` is empty)."""

    user_message = ""


class NotLatestReplyError(ReplyError):
    """A button under a reply that can no longer be regenerated or continued."""

    user_message = "Only the channel's latest reply can be regenerated or continued."


LENGTH_NOTE = "(cut off: this reply reached max_tokens; /settings set max_tokens N for more)"


class ReplyCutError(ReplyError):
    """The engine ended the reply early: its time limit, or the bot shutting down. The text
    streamed so far stays (stored as interrupted); this note tells the reader it is partial."""

    NOTES: ClassVar[dict[str, str]] = {
        "timeout": "(cut off: this reply hit the time limit)",
        "cancelled": "(cut off: the bot is restarting)",
    }

    def __init__(self, finish_reason: str) -> None:
        super().__init__(f"reply ended by the engine: {finish_reason}", self.NOTES[finish_reason])
