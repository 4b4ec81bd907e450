"""Parity with transformers for variants the fixtures lack: Mistral, biased Llama, wide heads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, save_hf_folder
from tests.models_core.helpers import ours, random_ids, reference, relative_error

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _variant(kind: str):
    import transformers as tf

    shape = dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, rope_theta=1e5, **shape))
    if kind == "llama-bias":  # attention_bias adds q/k/v and o_proj biases in transformers
        return tf.LlamaForCausalLM(tf.LlamaConfig(attention_bias=True, **shape))
    if kind == "llama-wide-heads":  # head_dim is not hidden_size / heads
        return tf.LlamaForCausalLM(tf.LlamaConfig(head_dim=32, tie_word_embeddings=False, **shape))
    raise ValueError(kind)


@pytest.fixture(scope="module", params=["mistral", "llama-bias", "llama-wide-heads"])
def variant_dir(request, tiny_checkpoints, tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = _variant(request.param)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoints["llama"] / name, out / name)
    return out


def test_variant_logits_and_cache_match_transformers(variant_dir):
    model, ref = ours(variant_dir), reference(variant_dir)
    ids = random_ids(model.config.vocab_size, 2, 21, seed=30)
    with torch.no_grad():
        full, _ = model(ids)
        assert relative_error(full, ref(ids).logits) < 1e-5
        step, past = model(ids[:, :15])
        steps = [step]
        for t in range(15, 21):
            step, past = model(ids[:, t : t + 1], past_key_values=past)
            steps.append(step)
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-5


def test_variant_round_trips_through_transformers(variant_dir, tmp_path):
    import transformers

    ckpt = load_checkpoint(variant_dir)
    out = save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, tmp_path / "out")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = random_ids(ckpt.config.vocab_size, 1, 9, seed=31)
    with torch.no_grad():
        want = reference(variant_dir)(ids).logits
        assert relative_error(theirs.eval()(ids).logits, want) < 1e-6


def test_gpt2_refuses_positions_past_its_table(tiny_checkpoints):
    model = ours(tiny_checkpoints["gpt2"])
    ids = torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="learned positions"):
        model(ids)
