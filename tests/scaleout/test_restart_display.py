"""A reply that restarts (its worker died; another generates it again) replaces what Discord
shows instead of adding to it, down to deleting messages the new, shorter text no longer needs."""

from __future__ import annotations

import itertools

from bot.backends import RestartPiece
from bot.replies import StreamedReply


class Message:
    ids = itertools.count(1)

    def __init__(self, channel: Channel, content: str) -> None:
        self.id, self.content, self.channel = next(self.ids), content, channel

    async def edit(self, *, content: str, allowed_mentions: object) -> None:
        self.content = content

    async def delete(self) -> None:
        self.channel.shown.remove(self)


class Channel:
    def __init__(self) -> None:
        self.shown: list[Message] = []
        self.sent = 0

    async def send(self, content: str, **kwargs: object) -> Message:
        self.sent += 1
        self.shown.append(Message(self, content))
        return self.shown[-1]


async def test_a_restart_edits_the_shown_message_instead_of_posting_another():
    channel = Channel()
    reply = StreamedReply(channel, edit_interval_s=0.0)
    for piece in ["Half a", " repl"]:
        await reply.push(piece)
    await reply.push(RestartPiece(""))
    assert [m.content for m in channel.shown] == ["Half a repl"]  # nothing new to show yet
    for piece in ["The whole", " reply."]:
        await reply.push(piece)
    await reply.finish()
    assert [m.content for m in channel.shown] == ["The whole reply."] and channel.sent == 1
    assert reply.text == "The whole reply."


async def test_a_shorter_restarted_reply_deletes_the_messages_it_no_longer_needs():
    channel = Channel()
    reply = StreamedReply(channel, edit_interval_s=0.0)
    for _ in range(500):
        await reply.push("word ")
    assert len(channel.shown) == 2
    await reply.push(RestartPiece("Short"))
    await reply.push(" answer.")
    await reply.finish()
    assert [m.content for m in channel.shown] == ["Short answer."]
    assert reply.message_ids == [channel.shown[0].id]
