"""Incremental detokenisation never splits a character; stop strings never leak."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from bot.engine.detokenize import MAX_HELD, REPLACEMENT, IncrementalDetokenizer, StopStrings

TEXT = "Emoji 🙂 and 日本語, ünïcödé 🎉 done"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))


def test_multibyte_characters_split_across_tokens_stream_whole(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    # the byte-level tokenizer spends several tokens on one emoji / CJK character
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT
    assert all(REPLACEMENT not in p for p in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_special_tokens_add_no_text(tokenizer):
    special = tokenizer.token_to_id("<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("hi there", add_special_tokens=False).ids
    out = "".join(detok.add(i) for i in [ids[0], special, *ids[1:]]) + detok.flush()
    assert out == "hi there"


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False).ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert REPLACEMENT in detok.flush()


class _CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["invalid byte", "special"])
def test_tokens_that_never_complete_text_are_not_held_forever(tokenizer, kind):
    """A model emitting stray UTF-8 continuation bytes (or text-less tokens) grew the held tail
    without end: each token decoded all of it (quadratic) and nothing reached the user."""
    if kind == "special":
        token = tokenizer.token_to_id("<|im_end|>")
    else:
        token = next(i for i in range(256, 1000) if tokenizer.decode([i]) == REPLACEMENT)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    n = 2000
    pieces = [detok.add(token) for _ in range(n)]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode([token] * n)  # nothing lost or added
    assert counting.decoded <= 4 * MAX_HELD * (n + 1)  # linear: was ~n * n
    if kind == "invalid byte":
        assert sum(1 for p in pieces if p) >= n // MAX_HELD  # shown as it comes, not at the end


def test_stop_strings_hold_partial_matches_and_cut_at_a_full_one():
    s = StopStrings(("STOP", "\n\n"))
    assert s.feed("Hello ST") == "Hello "  # "ST" may start STOP: held
    assert s.feed("ART now") == "START now"  # it did not
    assert s.feed(" and S") == " and "
    assert not s.stopped
    assert s.feed("TOP trailing") == ""
    assert s.stopped


def test_stop_string_inside_one_piece_and_flush():
    s = StopStrings(("<end>",))
    assert s.feed("abc<end>def") == "abc" and s.stopped
    t = StopStrings(("<end>",))
    assert t.feed("abc<en") == "abc"
    assert t.flush() == "<en"  # the end came first: the held text was never a stop string
    assert StopStrings(()).feed("x<end>") == "x<end>"
