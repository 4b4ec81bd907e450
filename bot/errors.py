"""Errors a user sees: each reply that cannot be given carries a short friendly line."""

from __future__ import annotations

from typing import ClassVar


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


class ReplyCutError(ReplyError):
    """The engine ended the reply early: its time limit, or the bot shutting down. The text
    streamed so far stays (stored as interrupted); this note tells the reader it is partial."""

    NOTES: ClassVar[dict[str, str]] = {
        "timeout": "(cut off: this reply hit the time limit)",
        "cancelled": "(cut off: the bot is restarting)",
    }

    def __init__(self, finish_reason: str) -> None:
        super().__init__(f"reply ended by the engine: {finish_reason}", self.NOTES[finish_reason])
