"""A thinking model's <think> block: never shown as the reply, never stored in the history, the
template's enable_thinking set from THINKING, and shown as a spoiler only when asked."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from bot.backends.base import RestartPiece
from bot.config import BotConfig
from bot.engine.loader import LoadedModel
from bot.service import ChatService
from bot.thinking import ThinkingSplitter, ThinkingStream, spoiler_note, thinking_notes
from tests.bot_core.fakes import FakeEngine
from tests.bot_core.test_conversation import BOT, converse, message

# Qwen3's template, cut to what matters here: it opens an empty block when thinking is off
QWEN3 = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
THOUGHT = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello, alice!"


def split(pieces: list[str], inside: bool = False) -> tuple[str, ThinkingSplitter]:
    splitter = ThinkingSplitter(inside)
    shown = "".join(splitter.feed(p) for p in pieces) + splitter.flush()
    return shown, splitter


def cuts(text: str, points: list[int]) -> list[str]:
    bounds = sorted({min(p, len(text)) for p in points} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.lists(st.integers(0, len(THOUGHT)), max_size=12))
def test_the_block_is_kept_apart_however_the_pieces_fall(points):
    shown, splitter = split(cuts(THOUGHT, points))
    assert shown == "Hello, alice!"
    assert splitter.thinking.strip() == "The user greets me. I should greet back."
    assert not splitter.unfinished


@given(st.lists(st.integers(0, 40), max_size=8))
def test_text_without_a_leading_block_is_shown_as_it_is(points):
    text = "I like <think> tags and </think> too."
    shown, splitter = split(cuts(text, points))
    assert shown == text and splitter.thinking == ""
    assert split(["  <thi"])[0] == "  <thi"  # a reply that merely looks like the tag's start


def test_a_reply_that_begins_inside_the_block_and_one_cut_while_thinking():
    shown, splitter = split(["still ", "thinking</", "think>\n\nDone."], inside=True)
    assert (shown, splitter.thinking) == ("Done.", "still thinking")
    shown, splitter = split(["<think>hmm, ", "let me </thi"])
    assert shown == "" and splitter.unfinished and splitter.thinking == "hmm, let me </thi"


async def test_a_restarted_reply_starts_the_split_over():
    class Pieces:
        result = None

        async def __aiter__(self):
            for piece in ["<think>a", "</think>Old", RestartPiece("<think>b</think>Ne"), "w"]:
                yield piece

    stream = ThinkingStream(Pieces())
    pieces = [piece async for piece in stream]
    assert pieces == ["Old", RestartPiece("Ne"), "w"] and isinstance(pieces[1], RestartPiece)
    assert stream.thinking == "b"


async def test_the_thinking_is_neither_shown_nor_stored_nor_fed_back(db, tmp_path):
    engine = FakeEngine(reply_text=THOUGHT, chat_template=QWEN3)
    service = ChatService(db, engine, BotConfig(data_dir=tmp_path, thinking="on"))
    assert await converse(service, message("hi")) == "Hello, alice!"
    assert "<think>" not in engine.prompt_text(0)  # THINKING=on: the model opens it itself
    await converse(service, message("again"))
    second = engine.prompt_text(1)
    assert "greets me" not in second and "<|im_start|>assistant\nHello, alice!<|im_end|>" in second
    stored = [m.content for m in await service.recent_messages(10, 10)]
    assert stored == ["hi", "Hello, alice!", "again", "Hello, alice!"]


async def test_thinking_off_asks_the_template_for_an_empty_block(db, tmp_path):
    engine = FakeEngine(reply_text="Hello!", chat_template=QWEN3)
    service = ChatService(db, engine, BotConfig(data_dir=tmp_path))  # THINKING=off by default
    assert await converse(service, message("hi")) == "Hello!"
    assert engine.prompt_text(0).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    auto = ChatService(db, engine, BotConfig(data_dir=tmp_path, thinking="auto"))
    await converse(auto, message("hi", channel=11))
    assert engine.prompt_text(1).endswith("<|im_start|>assistant\n")  # the template's default


async def test_a_model_that_does_not_think_is_read_as_it_is(service, engine):
    engine.reply_text = "<think>not a thinking model</think> so this is text"
    async with service.reply(message("hi"), bot=BOT) as reply:
        text = "".join([piece async for piece in reply])
        assert not isinstance(reply.stream, ThinkingStream)
    assert text == engine.reply_text


def test_the_notes_under_a_reply():
    thought = SimpleNamespace(thinking="I think || @everyone " + "x" * 3000, unfinished=True)
    assert thinking_notes(thought, "hidden") == [
        "it was still thinking: raise max_tokens, or turn THINKING off"
    ]
    note = thinking_notes(thought, "spoiler")[1]
    assert note.startswith("thought: ||I think | | @everyone") and note.endswith("…||")
    assert note.count("||") == 2 and len(note) < 1600  # fits under a reply, one spoiler
    assert thinking_notes(SimpleNamespace(), "spoiler") == []  # a model that does not think
    assert spoiler_note("a\n\nb") == "thought: ||a b||"


def test_a_version_thinks_by_its_tokens_or_its_template():
    vocab = {"<unk>": 0, "<think>": 1, "</think>": 2, "hi": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))

    def version(template: str, tok: Tokenizer) -> LoadedModel:
        info = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template))
        return LoadedModel(path=None, manifest=info, tokenizer=tok, chat=None)  # type: ignore[arg-type]

    plain = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    assert version("{{ x }}", tokenizer).thinks and not version("{{ x }}", plain).thinks
    assert version(QWEN3, plain).thinks
    assert version(QWEN3, plain).thinking_vars("off") == {"enable_thinking": False}
    assert version(QWEN3, plain).thinking_vars("on") == {"enable_thinking": True}
    assert version(QWEN3, plain).thinking_vars("auto") == {}
    assert version("{{ x }}", tokenizer).thinking_vars("off") == {}  # nothing to set
