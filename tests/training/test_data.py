"""Data specs, the deterministic split and the assistant-only loss mask."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from models.data import (
    IGNORE,
    TEXT_CHUNK_CHARS,
    TrainBatches,
    collate,
    encode_conversation,
    encode_items,
    load_dataset,
    split_items,
)
from models.errors import ModelError
from models.tokenizer import TokenizerBundle

# SmolLM2's template: a default system turn when the conversation has none
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "Hello there! How are you?"},
        {"role": "assistant", "content": "I'm fine, thanks. What about you?"},
        {"role": "user", "content": "Doing well 🙂"},
        {"role": "assistant", "content": "Great!\n\n  Glad to hear it."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n"},
    ],
    [
        {"role": "user", "content": "Ünïcödé and 日本語?"},
        {"role": "assistant", "content": " leading space, trailing space "},
    ],
]


def write_jsonl(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


@pytest.fixture(params=["chatml", "smollm"])
def tokenizer(request, tiny_llama_dir) -> TokenizerBundle:
    bundle = TokenizerBundle.from_hf_folder(tiny_llama_dir)
    if request.param == "smollm":
        bundle.chat_template = SMOL_TEMPLATE
    return bundle


# ---- specs -------------------------------------------------------------------------------------


def test_jsonl_spec(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    with path.open("a") as f:
        f.write("\n   \n")  # blank lines are skipped
    dataset = load_dataset(str(path))
    assert dataset.is_dialogue
    assert dataset.conversations == CONVERSATIONS


def _alternates(conversation: list[dict]) -> bool:
    roles = [m["role"] for m in conversation]
    return roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)


def test_chatterbot_english():
    dataset = load_dataset("chatterbot:english")
    assert len(dataset) > 1000
    assert all(len(c) >= 2 and _alternates(c) for c in dataset.conversations)
    assert all(m["content"].strip() for c in dataset.conversations for m in c)
    greetings = {(c[0]["content"], c[1]["content"]) for c in dataset.conversations}
    assert ("Hello", "Hi") in greetings  # greetings.yml opens with this pair


def test_chatterbot_unknown_language_lists_available():
    with pytest.raises(ModelError, match=r"unknown language.*english.*spanish"):
        load_dataset("chatterbot:klingon")


def test_chitchat():
    dataset = load_dataset("chitchat")
    assert len(dataset) > 3000  # conversations with at least two turns
    for conversation in dataset.conversations[:20]:
        assert len(conversation) >= 2 and _alternates(conversation)
        assert all(m["content"] == m["content"].strip() and m["content"] for m in conversation)


def test_text_spec_chunks_keep_all_text(tmp_path):
    lines = [f"line {i}: " + "word " * (i % 17) for i in range(600)]
    text = "\n".join(lines) + "\n" + "x" * (TEXT_CHUNK_CHARS + 500) + "\nthe end\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    dataset = load_dataset(str(path))
    assert not dataset.is_dialogue
    assert len(dataset.texts) > 2
    assert all(len(chunk) <= TEXT_CHUNK_CHARS for chunk in dataset.texts)
    assert "".join(dataset.texts) == text


# ---- split -------------------------------------------------------------------------------------


def test_split_is_deterministic_and_order_free():
    items = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(200)
    ]
    train, val = split_items(items, 0.05)
    assert len(val) == 10 and len(train) == 190
    assert not {json.dumps(v) for v in val} & {json.dumps(t) for t in train}
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    _, val_shuffled = split_items(shuffled, 0.05)
    assert sorted(map(json.dumps, val_shuffled)) == sorted(map(json.dumps, val))
    # keeps the input order inside each part
    assert [items.index(v) for v in val] == sorted(items.index(v) for v in val)


def test_split_holds_out_at_least_one():
    train, val = split_items(["a", "b", "c"], 0.05)
    assert len(val) == 1 and len(train) == 2
    with pytest.raises(ModelError, match="at least 2"):
        split_items(["only"], 0.05)


# ---- the loss mask -----------------------------------------------------------------------------


def expected_assistant_spans(text: str, conversation: list[dict]) -> list[tuple[int, int]]:
    """Independently: where each assistant reply and its <|im_end|> sit in the ChatML text."""
    spans, position = [], 0
    for message in conversation:
        header = f"<|im_start|>{message['role']}\n"
        start = text.index(header + message["content"] + "<|im_end|>", position) + len(header)
        end = start + len(message["content"]) + len("<|im_end|>")
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end
    return spans


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    for conversation in CONVERSATIONS:
        example = encode_conversation(tokenizer, conversation, max_length=512)
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        assert example.input_ids == encoding.ids
        spans = expected_assistant_spans(text, conversation)
        overlaps = [any(a < e and b > s for s, e in spans) for a, b in encoding.offsets]
        for i, (label, token) in enumerate(zip(example.labels, example.input_ids, strict=True)):
            if label != IGNORE:
                assert label == token and overlaps[i], f"label outside an assistant turn at {i}"
            else:
                assert not overlaps[i], f"assistant token {i} ({encoding.tokens[i]!r}) unlabelled"
        labelled = [
            t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE
        ]
        text_labelled = tokenizer.decode(labelled)
        for reply in (m["content"] for m in conversation if m["role"] == "assistant"):
            assert reply + "<|im_end|>" in text_labelled
        assert "<|im_start|>" not in text_labelled and "user" not in text_labelled


def test_truncation(tokenizer):
    conversation = CONVERSATIONS[0]
    full = encode_conversation(tokenizer, conversation, max_length=512)
    cut = encode_conversation(tokenizer, conversation, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.labels == full.labels[: len(cut.labels)]
    first_reply = full.labels.index(next(lab for lab in full.labels if lab != IGNORE))
    assert encode_conversation(tokenizer, conversation, max_length=first_reply) is None


def test_collate_and_batches(tokenizer):
    examples = encode_items(tokenizer, CONVERSATIONS, 512, dialogue=True)
    ids, labels = collate(examples, pad_id=0)
    width = max(len(e.input_ids) for e in examples)
    assert ids.shape == labels.shape == (3, width)
    for row, e in enumerate(examples):
        assert ids[row, : len(e.input_ids)].tolist() == e.input_ids
        assert (labels[row, len(e.labels) :] == IGNORE).all()
    stream = TrainBatches(list(range(10)), lambda i: i, batch_size=4, seed=3)
    epoch0 = [x for c in range(3) for x in stream.batch(c)]
    epoch1 = [x for c in range(3, 6) for x in stream.batch(c)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled each epoch
    assert TrainBatches(list(range(10)), lambda i: i, 4, seed=3).batch(4) == stream.batch(4)
