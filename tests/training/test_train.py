"""The training loop on tiny checkpoints: loss goes down, resume, LoRA, training from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.__main__ import main
from models.checkpoint import load_checkpoint
from models.model import CausalLM
from models.train import LoRA, Trainer, add_lora, lr_factor, merge_lora

from .test_data import write_jsonl

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]


def greeting_conversations(n: int = 48) -> list[list[dict]]:
    """A small, learnable dialogue set."""
    return [
        [
            {"role": "user", "content": f"Hello, I am {NAMES[i % 8]}."},
            {"role": "assistant", "content": f"Hi {NAMES[i % 8]}, nice to meet you."},
            {"role": "user", "content": f"What is {i % 5} plus one?"},
            {"role": "assistant", "content": f"It is {i % 5 + 1}."},
        ]
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", greeting_conversations())


def run_cli(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def loop_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--no-progress", "--json", *extra]


def test_schedule_warms_up_then_decays():
    factors = [lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert factors[:4] == sorted(factors[:4]) and factors[0] < 0.5
    assert factors[4] == pytest.approx(1.0)
    assert factors[4:] == sorted(factors[4:], reverse=True)
    assert lr_factor(20, 4, 20) == pytest.approx(0.1)


def test_finetune_lowers_held_out_loss(tiny_checkpoints, chat_file, tmp_path, capsys):
    out = tmp_path / "tuned"
    args = loop_args(chat_file, out, "--max-steps", "12", "--lr", "3e-3", "--eval-every", "6")
    result = run_cli(["finetune", str(tiny_checkpoints["llama"]), *args], capsys)
    assert result["steps"] == 12
    assert result["val_loss_after"] < 0.8 * result["val_loss_before"]
    assert result["val_perplexity_after"] < result["val_perplexity_before"]
    assert result["out"] == str(out) and result["seconds_per_step"] > 0
    assert not (tmp_path / "tuned.partial").exists()
    # the saved folder holds the best weights: its loss is the reported one
    tuned = load_checkpoint(out)
    base = load_checkpoint(tiny_checkpoints["llama"])
    assert tuned.tokenizer.chat_template == base.tokenizer.chat_template
    changed = [n for n, t in tuned.tensors.items() if not torch.equal(t, base.tensors[n])]
    assert len(changed) == len(base.tensors)


def test_resume_continues_from_saved_step(
    tiny_checkpoints, chat_file, tmp_path, capsys, monkeypatch
):
    base = str(tiny_checkpoints["qwen2"])
    common = ("--max-steps", "6", "--eval-every", "3", "--lr", "3e-3", "--batch-size", "4")
    straight = tmp_path / "straight"
    run_cli(["finetune", base, *loop_args(chat_file, straight, *common)], capsys)

    # interrupt a second run right after its step-3 checkpoint
    original_save = Trainer.save

    def save_then_stop(self):
        original_save(self)
        if self.state.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        main(["finetune", base, *loop_args(chat_file, resumed, *common)])
    monkeypatch.setattr(Trainer, "save", original_save)
    assert not resumed.exists() and (tmp_path / "resumed.partial" / "state.pt").is_file()

    assert main(["finetune", base, *loop_args(chat_file, resumed, *common, "--resume")]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 3" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["steps"] == 6
    assert not (tmp_path / "resumed.partial").exists()
    a, b = load_checkpoint(straight).tensors, load_checkpoint(resumed).tensors
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_merge_matches_wrapper(tiny_checkpoints, kind):
    model = CausalLM.from_checkpoint(load_checkpoint(tiny_checkpoints[kind]))
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        before, _ = model(ids)
    params = add_lora(model, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        start, _ = model(ids)
        torch.testing.assert_close(start, before)  # B starts at zero
        for p in params:
            p.normal_(0, 0.1)
        wrapped, _ = model(ids)
    assert (wrapped - before).abs().max() > 1e-3
    merge_lora(model)
    assert not any(isinstance(m, LoRA) for m in model.modules())
    assert set(model.hf_state_dict()) == set(load_checkpoint(tiny_checkpoints[kind]).tensors)
    with torch.no_grad():
        merged, _ = model(ids)
    torch.testing.assert_close(merged, wrapped, rtol=1e-4, atol=1e-4)


def test_lora_finetune_saves_merged_weights(tiny_checkpoints, chat_file, tmp_path, capsys):
    out = tmp_path / "lora"
    args = loop_args(chat_file, out, "--max-steps", "8", "--lr", "1e-2", "--lora", "4")
    result = run_cli(["finetune", str(tiny_checkpoints["gpt2"]), *args], capsys)
    assert result["lora"] == 4
    assert result["val_loss_after"] < result["val_loss_before"]
    tuned = load_checkpoint(out)  # plain HF names only: the update is merged
    base = load_checkpoint(tiny_checkpoints["gpt2"])
    assert set(tuned.tensors) == set(base.tensors)
    assert not torch.equal(
        tuned.tensors["transformer.h.0.attn.c_attn.weight"],
        base.tensors["transformer.h.0.attn.c_attn.weight"],
    )
    assert torch.equal(
        tuned.tensors["transformer.wte.weight"], base.tensors["transformer.wte.weight"]
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_from_scratch_on_dialogue(chat_file, tmp_path, capsys, family):
    out = tmp_path / "scratch"
    size = ("--layers", "1", "--width", "32", "--heads", "2", "--vocab-size", "300")
    args = loop_args(chat_file, out, "--max-steps", "10", "--family", family, *size)
    result = run_cli(["train", *args], capsys)
    assert result["val_loss_after"] < result["val_loss_before"]
    ckpt = load_checkpoint(out)
    assert ckpt.config.family == family and ckpt.config.num_layers == 1
    tok = ckpt.tokenizer
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tok.special_tokens)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ckpt.config.eos_token_id == tok.token_id("<|im_end|>")


def test_train_from_scratch_on_text(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(
        "".join(f"The {w} sat on the mat number {i}.\n" for i in range(400) for w in ["cat", "dog"])
    )
    out = tmp_path / "text-model"
    size = ("--layers", "1", "--width", "32", "--heads", "2", "--vocab-size", "300")
    result = run_cli(
        ["train", *loop_args(text, out, "--max-steps", "10", "--max-length", "64", *size)], capsys
    )
    assert result["val_loss_after"] < result["val_loss_before"]
    assert result["train_windows"] > 1
    ckpt = load_checkpoint(out)
    assert ckpt.tokenizer.chat_template is None
    assert ckpt.config.max_position_embeddings == 64


def test_early_stopping_keeps_the_best_weights(tiny_checkpoints, chat_file, tmp_path, capsys):
    """A learning rate that wrecks the model: training stops and the untouched weights are kept."""
    out = tmp_path / "wrecked"
    tune = ("--max-steps", "20", "--lr", "5", "--warmup-steps", "0", "--eval-every", "2")
    result = run_cli(
        [
            "finetune",
            str(tiny_checkpoints["llama"]),
            *loop_args(chat_file, out, *tune, "--patience", "1"),
        ],
        capsys,
    )
    assert result["stopped_early"] and result["steps"] == 2
    assert result["best_step"] == 0
    assert result["val_loss_after"] == pytest.approx(result["val_loss_before"])
    tuned, base = load_checkpoint(out).tensors, load_checkpoint(tiny_checkpoints["llama"]).tensors
    assert all(torch.equal(tuned[name], base[name]) for name in base)


def test_train_defaults_run_many_steps_into_the_data_folder(tmp_path, capsys, monkeypatch):
    """Without --max-steps, --epochs or --out: TRAIN_STEPS steps (one epoch of a short text was
    a single step), saved under DATA_DIR/runs, never in the working directory."""
    from models import train

    monkeypatch.setattr(train, "TRAIN_STEPS", 6)  # the real default, made quick
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    text = tmp_path / "short.txt"
    text.write_text(
        "".join(f"A short text, line {i}, as examples/corpus.txt is.\n" for i in range(300))
    )
    size = ("--layers", "1", "--width", "32", "--heads", "2", "--vocab-size", "300")
    argv = ["train", "--data", str(text), "--no-progress", "--json", "--max-length", "64", *size]
    result = run_cli(argv, capsys)
    assert result["steps"] == 6
    out = Path(result["out"])
    assert out.parent == tmp_path / "data" / "runs" and out.name.startswith("train-")
    assert load_checkpoint(out).config.num_layers == 1


def test_the_step_and_output_defaults_of_each_command():
    import argparse

    from models.train import (
        TRAIN_STEPS,
        _fill_defaults,
        add_finetune_arguments,
        add_train_arguments,
    )

    def parsed(adder, argv: list[str], command: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        adder(parser)
        args = parser.parse_args(argv)
        _fill_defaults(args, command)
        return args

    train = parsed(add_train_arguments, ["--data", "x.txt"], "train")
    assert (train.max_steps, train.epochs) == (TRAIN_STEPS, 1.0) and TRAIN_STEPS >= 100
    assert Path(train.out).parts[-3:-1] == ("data", "runs") or "runs" in Path(train.out).parts
    by_epochs = parsed(add_train_arguments, ["--data", "x.txt", "--epochs", "3"], "train")
    assert (by_epochs.max_steps, by_epochs.epochs) == (None, 3.0)
    tune = parsed(add_finetune_arguments, ["base", "--data", "x", "--out", "o"], "finetune")
    assert (tune.max_steps, tune.epochs, tune.out) == (None, 1.0, "o")


def test_progress_json_and_a_held_out_file(tiny_checkpoints, chat_file, tmp_path, capsys):
    """--progress-json: one JSON line per step on stdout (bot/finetune reads them);
    --val-data: validation on that file, training on every conversation of --data."""
    held = write_jsonl(tmp_path / "held.jsonl", greeting_conversations(3))
    out = tmp_path / "tuned"
    args = loop_args(chat_file, out, "--max-steps", "3", "--progress-json", "--val-data", str(held))
    assert main(["finetune", str(tiny_checkpoints["llama"]), *args]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    steps = [x for x in lines if x.get("event") == "step"]
    assert [(x["step"], x["total"]) for x in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(x["loss"], float) and x["loss"] > 0 for x in steps)
    assert lines[-1]["val_examples"] == 3 and lines[-1]["train_conversations"] == 48
