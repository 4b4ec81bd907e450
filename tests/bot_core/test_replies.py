"""Unit tests of reply splitting and streamed posting/editing (bot/replies.py)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import discord
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.replies import (
    BLANK,
    CLOSE,
    FENCE,
    MAX_LANG,
    MAX_LEN,
    MIN_LEN,
    InteractionReply,
    Splitter,
    StreamedReply,
    message_parts,
    split_message,
)


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


def test_an_early_line_break_does_not_make_a_tiny_first_chunk() -> None:
    """/persona show shows the first chunk: it was just "You are Bob." for a long persona."""
    chunks = split_message("You are Bob.\n" + "word " * 600)
    assert len(chunks[0]) > MAX_LEN - 20 and chunks[0].startswith("You are Bob.\nword")


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


@pytest.mark.asyncio
async def test_a_chunk_of_only_whitespace_is_still_postable() -> None:
    """Model output of thousands of spaces made a whitespace-only chunk, which Discord refuses."""
    ch = _Channel()
    r = StreamedReply(ch, edit_interval_s=0.0)  # type: ignore[arg-type]
    await r.push("hi")
    for _ in range(50):
        await r.push(" " * 100)
    await r.finish("x")
    final = {mid: c for _, mid, c, _ in ch.log}
    shown = [final[m] for m in r.message_ids]
    assert len(shown) == 3 and all(c.strip() for c in shown)
    assert shown[1] == BLANK + " " * (len(shown[1]) - 1)
    assert "".join(shown).replace(BLANK, " ").split() == ["hi", "x"]


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


# ---- splitting any text: terminates, linear, lossless, fences balanced ---------------------------
_FENCE = re.compile(r"```(\w*)")  # the fence rule split_message documents, restated


def _fence_state(text: str, lang: str | None = None) -> str | None:
    """The language of a code block open at the end of text (`lang`: one open at its start)."""
    for m in _FENCE.finditer(text):
        lang = m.group(1) if lang is None else None
    return lang


def _check_split(text: str, limit: int) -> list[str]:
    """split_message's contract: each chunk at most `limit` characters; its slices of the text,
    in order, are the text less at most one line break or space between two of them; each chunk
    is its slice with a reopen marker added before it exactly when a code block was open at the
    slice's start, and CLOSE after it exactly when one is open at its end (except the last);
    every chunk but the last balanced."""
    parts = list(message_parts(text, limit))
    assert [p.chunk for p in parts] == split_message(text, limit)
    assert parts[0].start == 0 and parts[-1].end == len(text) == parts[-1].next_start
    lang = None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        assert len(part.chunk) <= limit
        assert part.start < part.end or (last and part.start == part.end)  # progress
        if not last:
            assert parts[i + 1].start == part.next_start
            assert part.next_start == part.end or text[part.end] in ("\n", " ")
            assert part.next_start <= part.end + 1
        piece = text[part.start : part.end]
        reopen = "" if lang is None else FENCE + (lang if len(lang) <= MAX_LANG else "") + "\n"
        lang = _fence_state(piece, lang)
        close = CLOSE if lang is not None and not last else ""
        assert part.chunk == reopen + piece + close, (i, part.chunk[:40], part.chunk[-40:])
        if not last:
            assert _fence_state(part.chunk) is None, part.chunk[-80:]
    assert (_fence_state(parts[-1].chunk) is None) == (_fence_state(text) is None)
    for a, e in zip(parts, parts[4:], strict=False):  # progress: any four chunks but the last
        assert e.start - a.start >= limit // 2 - 40  # cover half a chunk: linear in the text
    return [p.chunk for p in parts]


_atoms = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="ab \n", max_size=30),
    st.sampled_from(["```", "`", "``", "```py\n", "```python\n", "\n```\n", " ", "\n"]),
    st.builds(lambda n: "```" + "x" * n, st.integers(0, 2500)),  # long language tags
    st.builds(lambda n: "w" * n, st.integers(1, 2500)),  # words longer than a message
    st.builds(lambda n: "漢字かな" * n, st.integers(1, 600)),
    st.builds(lambda n: "👨‍👩‍👧‍👦🇫🇷👍🏽e\u0301" * n, st.integers(1, 300)),
)
_texts = st.lists(_atoms, max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_texts, limit=st.sampled_from([MIN_LEN, 157, 500, MAX_LEN]))
def test_split_message_bounds_and_gives_back_any_text(text: str, limit: int) -> None:
    _check_split(text, limit)


@settings(max_examples=100, deadline=None)
@given(blocks=st.lists(st.tuples(_texts, st.sampled_from(["", "py", "x" * 40]), _texts)))
def test_split_message_keeps_every_chunk_of_balanced_code_balanced(
    blocks: list[tuple[str, str, str]],
) -> None:
    text = "".join(
        f"{prose.replace('`', '')}\n```{lang}\n{code.replace('`', '')}\n```\n"
        for prose, lang, code in blocks
    )
    for c in _check_split(text, MAX_LEN):
        assert _fence_state(c) is None


@settings(max_examples=100, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_splitter_of_a_growing_text_agrees_with_split_message(text: str, cuts: list[int]) -> None:
    splitter = Splitter(MIN_LEN)
    for cut in [*sorted(c % (len(text) + 1) for c in cuts), len(text)]:
        assert splitter.split(text[:cut]) == split_message(text[:cut], MIN_LEN)


def test_emoji_and_accents_are_not_cut_apart() -> None:
    family = "👨‍👩‍👧‍👦"
    chunks = split_message(family * 700)
    assert all(len(c) <= MAX_LEN for c in chunks) and "".join(chunks) == family * 700
    assert all(c.startswith("👨") and c.endswith("👦") for c in chunks)


_REPORTED = "```" + "a" * 2100  # issue 11: a persona of ``` and ~2,100 letters, then /persona show


def test_reported_persona_splits_into_bounded_chunks() -> None:
    chunks = _check_split(_REPORTED, MAX_LEN)
    assert len(chunks) == 2 and chunks[1] == "```\n" + "a" * (2100 - (MAX_LEN - 7))


def test_reported_persona_does_not_hang_the_process() -> None:
    """The same input in a child process with a memory cap, so that a regression (on main it spun
    forever, allocating) fails this test instead of hanging the suite or the machine."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from bot.replies import split_message\n"
        f"chunks = split_message({_REPORTED!r} + '\\n/persona show ' * 3)\n"
        "print(len(chunks), max(map(len, chunks)))\n"
    )
    root = Path(__file__).resolve().parents[2]  # the child imports this checkout's bot/
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-500:]
    count, longest = map(int, done.stdout.split())
    assert count == 2 and longest <= MAX_LEN


class _Reusable(_Msg):
    """An earlier answer's message: edits return it, as discord.py returns the edited message;
    it records views and deletion."""

    async def edit(self, **kw: object) -> _Reusable:  # type: ignore[override]
        self.log.append(("edit", self.id, kw.get("content"), "view" in kw and kw["view"]))
        self.content = str(kw.get("content", self.content))
        return self

    async def delete(self) -> None:
        self.log.append(("delete", self.id, None, None))


@pytest.mark.asyncio
async def test_a_new_answer_writes_over_the_old_messages_and_deletes_the_rest() -> None:
    ch = _Channel()
    old = [_Reusable("old one", ch.log), _Reusable("old two", ch.log)]
    view = object()
    r = StreamedReply(ch, edit_interval_s=0.0, reuse=old, view=view)  # type: ignore[arg-type]
    await r.push("new")
    await r.finish()
    await r.drop_unused()
    assert r.message_ids == [old[0].id]  # nothing posted
    assert ch.log[0] == ("edit", old[0].id, "new", view)  # the first carries the view
    assert ch.log[-1] == ("delete", old[1].id, None, None)
    await r.set_view(0, None)
    assert ch.log[-1] == ("edit", old[0].id, "new", None)  # the text stays, the view goes
