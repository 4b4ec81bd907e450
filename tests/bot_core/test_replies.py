"""Unit tests of reply splitting and streamed posting/editing (bot/replies.py)."""

from __future__ import annotations

import itertools

import discord
import pytest

from bot.replies import MAX_LEN, InteractionReply, StreamedReply, split_message


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


def test_long_text_splits_between_words() -> None:
    words = [f"w{i}" for i in range(1500)]
    chunks = split_message(" ".join(words))
    assert len(chunks) > 1
    assert all(len(c) <= MAX_LEN for c in chunks)
    assert " ".join(chunks).split() == words  # no word cut, nothing lost


def test_code_block_is_closed_and_reopened() -> None:
    code = "\n".join(f"print({i})  # line" for i in range(300))
    text = "Here:\n```python\n" + code + "\n```\ndone"
    chunks = split_message(text)
    assert len(chunks) > 1
    for c in chunks:
        assert len(c) <= MAX_LEN
        assert c.count("```") % 2 == 0, c[:60]
    assert chunks[1].startswith("```python\n")
    body = [line for c in chunks for line in c.splitlines() if line.startswith("print(")]
    assert body == code.splitlines()


def test_word_longer_than_limit_is_hard_cut() -> None:
    chunks = split_message("x" * 4500)
    assert "".join(chunks) == "x" * 4500
    assert all(len(c) <= MAX_LEN for c in chunks)


class _Msg:
    _ids = itertools.count(1)

    def __init__(self, content: str, log: list) -> None:
        self.id, self.content, self.log = next(self._ids), content, log

    async def edit(self, *, content: str, allowed_mentions: discord.AllowedMentions) -> None:
        self.log.append(("edit", self.id, content, allowed_mentions.to_dict()))
        self.content = content


class _Channel:
    def __init__(self) -> None:
        self.log: list = []

    async def send(self, content: str, **kw: object) -> _Msg:
        am = kw["allowed_mentions"]
        assert isinstance(am, discord.AllowedMentions)
        msg = _Msg(content, self.log)
        self.log.append(("send", msg.id, content, am.to_dict()))
        return msg


@pytest.mark.asyncio
async def test_stream_posts_then_throttles_edits() -> None:
    now = [0.0]
    ch = _Channel()
    r = StreamedReply(ch, edit_interval_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    await r.push("Hello")
    await r.push(" there")  # within the interval: no edit
    now[0] = 1.5
    await r.push(" @everyone")
    await r.finish()
    kinds = [e[0] for e in ch.log]
    assert kinds == ["send", "edit"]
    assert ch.log[-1][2] == "Hello there @everyone"
    assert all(e[3] == {"parse": []} for e in ch.log)


@pytest.mark.asyncio
async def test_stream_continues_in_new_message_past_limit() -> None:
    ch = _Channel()
    r = StreamedReply(ch, edit_interval_s=0.0)  # type: ignore[arg-type]
    for _ in range(500):
        await r.push("word ")
    await r.finish()
    sent = [e for e in ch.log if e[0] == "send"]
    assert len(sent) == 2 and len(r.message_ids) == 2
    final = {mid: c for _, mid, c, _ in ch.log}
    assert " ".join(final[m] for m in r.message_ids).split() == ["word"] * 500


class _Followup:
    def __init__(self, log: list) -> None:
        self.log = log

    async def send(self, content: str, **kw: object) -> _Msg:
        assert kw["wait"] is True and isinstance(kw["allowed_mentions"], discord.AllowedMentions)
        msg = _Msg(content, self.log)
        self.log.append(("followup", msg.id, content, kw["ephemeral"]))
        return msg


class _Interaction:
    """What InteractionReply uses of a deferred discord.Interaction."""

    def __init__(self) -> None:
        self.log: list = []
        self.channel = None
        self.followup = _Followup(self.log)

    async def edit_original_response(self, **kw: object) -> _Msg:
        assert kw["allowed_mentions"].to_dict() == {"parse": []}  # type: ignore[attr-defined]
        msg = _Msg(str(kw["content"]), self.log)
        self.log.append(("original", msg.id, kw["content"], None))
        return msg


@pytest.mark.asyncio
async def test_interaction_reply_streams_into_the_original_then_followups() -> None:
    it = _Interaction()
    r = InteractionReply(it, ephemeral=True, edit_interval_s=0.0)  # type: ignore[arg-type]
    for _ in range(500):
        await r.push("word ")
    await r.finish("\n\n*cut short*")
    kinds = [e[0] for e in it.log]
    assert kinds[0] == "original" and kinds.count("original") == 1
    followups = [e for e in it.log if e[0] == "followup"]
    assert len(followups) == 1 and followups[0][3] is True  # ephemeral like the answer
    assert "edit" in kinds  # the original was edited as the text grew
    final = {mid: c for _, mid, c, *_ in it.log}
    text = " ".join(final[m] for m in r.message_ids)
    assert text.split()[:-2] == ["word"] * 500 and text.endswith("*cut short*")
