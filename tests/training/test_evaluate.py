"""`python -m models eval`: metric values, JSON fields, agreement with the training loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.__main__ import main
from models.checkpoint import load_checkpoint
from models.data import IGNORE
from models.evaluate import reply_pairs, text_metrics, token_loss
from models.model import CausalLM

from .test_data import write_jsonl

REPLY = "Hi there, nice to meet you friend."


def test_metrics_of_identical_and_different_replies():
    refs = ["the cat sat on the mat", "hello there my good old friend"]
    same = text_metrics(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["rouge_l"] == pytest.approx(1.0)
    other = text_metrics(["the cat sat on a hat", "goodbye"], refs)
    assert 0 <= other["bleu"] < 100 and 0 < other["rouge_l"] < 1


def test_reply_pairs_take_the_first_assistant_turn():
    conversation = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ]
    assert reply_pairs([conversation, conversation[:2]]) == [(conversation[:2], "Hello!")]


def test_eval_of_a_memorized_reply(tiny_checkpoints, tmp_path, capsys):
    """A model tuned until it repeats the reference scores BLEU 100 and ROUGE-L 1 on it."""
    conversation = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": REPLY},
    ]
    data = write_jsonl(tmp_path / "memo.jsonl", [conversation] * 8)  # the held-out copy is seen
    out = tmp_path / "memo"
    tune = ["--max-steps", "40", "--lr", "1e-2", "--warmup-steps", "2", "--batch-size", "4"]
    args = ["--data", str(data), "--out", str(out), "--no-progress", "--json", *tune]
    assert main(["finetune", str(tiny_checkpoints["llama"]), *args]) == 0
    tuned = json.loads(capsys.readouterr().out.splitlines()[-1])

    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "bleu", "rouge_l", "samples"} <= set(result)
    assert result["samples"] == [{"prompt": "Hello there!", "reference": REPLY, "reply": REPLY}]
    assert result["bleu"] == pytest.approx(100.0)
    assert result["rouge_l"] == pytest.approx(1.0)
    # the same held-out split and loss as the fine-tune reported
    assert result["perplexity"] == pytest.approx(tuned["val_perplexity_after"], rel=1e-4)
    assert 1.0 <= result["perplexity"] < 1.5


def test_eval_of_plain_text_gives_perplexity_only(tiny_checkpoints, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"Paragraph {i}: the quick brown fox.\n" * 30 + "\n" for i in range(6)))
    argv = ["eval", str(tiny_checkpoints["gpt2"]), "--data", str(text), "--split", "all", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1 and result["tokens"] > 0
    assert result["bleu"] is None and result["samples"] == []


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_token_loss_matches_full_logits(tiny_checkpoints, kind):
    """The loss on labelled positions only equals cross-entropy over the model's full logits."""
    model = CausalLM.from_checkpoint(load_checkpoint(tiny_checkpoints[kind]))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=generator)
    labels = ids.masked_fill(torch.rand(3, 10, generator=generator) < 0.5, IGNORE)
    with torch.no_grad():
        loss, count = token_loss(model, ids, labels)
        logits, _ = model(ids)
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert count == int((labels[:, 1:] != IGNORE).sum()) > 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
