"""Prompt building inside the token budget: newest turns kept, persona first, speakers named."""

from __future__ import annotations

import pytest

from bot.errors import MessageTooLongError
from bot.prompt import build_prompt, chat_messages
from bot.turns import Turn
from tests.bot_core.fakes import FakeModel

MODEL = FakeModel(max_context=4096, generation={}, name="m", version=1)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def render(messages: list[dict]) -> str:
    return MODEL.render_chat(messages, add_generation_prompt=True)


def encode_chat(messages: list[dict]) -> tuple[str, list[int]]:
    return MODEL.encode_prompt(messages)


def alice(text: str) -> Turn:
    return Turn("user", text, 1, "alice")


def bot(text: str) -> Turn:
    return Turn("assistant", text, 99, "bot")


CONVERSATION = [alice(f"question {i}") if i % 2 == 0 else bot(f"answer {i}") for i in range(20)]


def size(system: str | None, turns: list[Turn]) -> int:
    return len(encode(render(chat_messages(system, turns, named=False))))


def test_everything_fits_when_the_budget_is_large():
    prompt = build_prompt(CONVERSATION, system="Be brief.", encode_chat=encode_chat, budget=10_000)
    assert prompt.turns_kept == 20 and prompt.turns_dropped == 0
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.ids == encode(prompt.text)


@pytest.mark.parametrize("keep", [1, 2, 5, 11])
def test_newest_turns_kept_oldest_dropped_at_the_exact_budget(keep):
    turns = CONVERSATION[:-1]  # ends with a user turn, as when a message arrives
    budget = size("Be brief.", turns[-keep:])
    prompt = build_prompt(turns, system="Be brief.", encode_chat=encode_chat, budget=budget)
    assert len(prompt.ids) <= budget
    kept = prompt.turns_kept
    assert (
        kept >= keep
    )  # a leading assistant turn costs nothing (it is dropped), so kept may be keep+1
    assert kept < len(turns) and size("Be brief.", turns[-(kept + 1) :]) > budget
    assert turns[-1].content in prompt.text
    for dropped in turns[: len(turns) - kept]:
        assert f"\n{dropped.content}<|im_end|>" not in prompt.text
    assert prompt.text.startswith("<|im_start|>system\nBe brief.")


def test_a_kept_window_is_used_while_it_fits_and_a_cut_leaves_room_to_grow():
    turns = CONVERSATION[:-1]
    whole = size("Be brief.", turns)
    args = dict(system="Be brief.", encode_chat=encode_chat)
    hinted = build_prompt(turns, **args, budget=whole, keep=7)
    assert hinted.turns_kept == 7  # everything would fit, but the window starts where it did
    cut = build_prompt(turns, **args, budget=whole - 1, trim_to=0.5)
    assert len(cut.ids) <= (whole - 1) // 2  # over budget: cut to half of it...
    assert size("Be brief.", turns[-(cut.turns_kept + 1) :]) > (whole - 1) // 2  # ...not less
    too_long = build_prompt(turns, **args, budget=size("Be brief.", turns[-3:]), keep=7)
    assert too_long.turns_kept < 7  # a window that no longer fits is cut as usual


def test_without_persona_there_is_no_system_turn():
    prompt = build_prompt([alice("hi")], system=None, encode_chat=encode_chat, budget=1000)
    assert prompt.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not prompt.named


def test_speakers_named_in_multi_user_channels_and_bot_is_assistant():
    turns = [alice("hello"), bot("hi alice"), Turn("user", "and me?", 2, "Bob: the\nbuilder")]
    prompt = build_prompt(turns, system=None, encode_chat=encode_chat, budget=1000)
    assert prompt.named
    assert "<|im_start|>user\nalice: hello<|im_end|>" in prompt.text
    assert "<|im_start|>assistant\nhi alice<|im_end|>" in prompt.text
    assert "<|im_start|>user\nBob the builder: and me?<|im_end|>" in prompt.text


def test_consecutive_turns_of_one_role_are_merged_and_a_leading_reply_dropped():
    turns = [bot("orphan reply"), alice("one"), Turn("user", "two", 2, "bob"), bot("ok")]
    messages = chat_messages("sys", turns, named=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "alice: one\nbob: two"


def test_a_message_too_long_for_the_budget_is_refused_with_a_friendly_line():
    with pytest.raises(MessageTooLongError) as info:
        build_prompt([alice("x" * 500)], system="sys", encode_chat=encode_chat, budget=100)
    assert "too long" in info.value.user_message and "\n" not in info.value.user_message


def test_a_continuation_prompt_ends_inside_the_reply() -> None:
    from bot.prompt import encode_continuation, encode_messages

    messages = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}]
    text, ids = encode_continuation(MODEL, messages)  # type: ignore[arg-type]
    head, head_ids = encode_messages(MODEL, messages[:1])  # type: ignore[arg-type]
    assert text == head + "one two" and ids == head_ids + MODEL.encode_text("one two")
    assert encode_continuation(MODEL, messages[:1]) == (head, head_ids)  # type: ignore[arg-type]
