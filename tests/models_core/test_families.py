"""Every family's torch CausalLM against transformers, quirks switched on (windows, rope scaling
past the original length, soft-caps), plus the config reading each family relies on."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models.checkpoint import load_checkpoint, save_hf_folder
from models.errors import ModelError
from models.model import CausalLM, ModelConfig
from models.random_checkpoint import FAMILY_KINDS, WINDOW
from tests.models_core.helpers import random_ids, relative_error

LENGTH = 300  # past every window (24) and the original lengths of the scaled ropes (64, 128)


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(vocab, 2, LENGTH, seed=40)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # the second row is shorter: left padding, as batched generation has it
    return ids, mask


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_logits_and_cache_match_transformers(kind, family_checkpoints):
    path = family_checkpoints[kind]
    ours, theirs = CausalLM.from_checkpoint(load_checkpoint(path)), _hf(path)
    ids, mask = _left_padded(ours.config.vocab_size)
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask).logits
        full, _ = ours(ids, attention_mask=mask)
        real = mask.bool()
        assert relative_error(full[real], want[real]) < 1e-5
        # cached steps give the same logits as the full pass
        first = LENGTH - 6
        step, past = ours(ids[:, :first], attention_mask=mask[:, :first])
        steps = [step]
        for t in range(first, LENGTH):
            step, past = ours(ids[:, t : t + 1], past, attention_mask=mask[:, : t + 1])
            steps.append(step)
    got = torch.cat(steps, dim=1)
    assert relative_error(got[real], full[real]) < 1e-5


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_config_round_trips_through_transformers(kind, family_checkpoints, tmp_path):
    import transformers

    ckpt = load_checkpoint(family_checkpoints[kind])
    assert ModelConfig.from_hf(ckpt.config.to_hf()) == ckpt.config
    out = save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, tmp_path / "out")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = random_ids(ckpt.config.vocab_size, 1, 80, seed=41)
    with torch.no_grad():
        want = _hf(family_checkpoints[kind])(ids).logits
        assert relative_error(theirs.eval()(ids).logits, want) < 1e-6


def test_family_quirks_are_read(family_checkpoints):
    def cfg(kind: str) -> ModelConfig:
        return load_checkpoint(family_checkpoints[kind]).config

    gemma2 = cfg("gemma2")
    assert gemma2.sliding_layers == (0,) and gemma2.sliding_window == WINDOW
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (0.1, 0.6)
    assert gemma2.norm_layout == "sandwich" and gemma2.norm_offset == 1.0
    assert gemma2.softmax_scale == pytest.approx(24**-0.5)
    gemma3 = cfg("gemma3")
    assert (gemma3.layer_rope(0), gemma3.layer_rope(1)) == (1e4, 1e6)
    assert gemma3.rope_scaling["rope_type"] == "linear" and gemma3.qk_norm == "head"
    phi3 = cfg("phi3")
    # LongRoPE's short factors hold up to the original length: the context stops there
    assert phi3.max_position_embeddings == 512 and phi3.rotary_dims == 16
    assert phi3.fused_projections and phi3.sliding_layers == (0, 1)
    assert cfg("smollm3").no_rope_layers == (1,)
    assert cfg("olmo2").norm_layout == "post" and cfg("olmo2").qk_norm == "full"
    assert cfg("qwen3").head_dim == 32 and cfg("qwen3").hidden_size // 4 == 16
    assert cfg("llama3").eos_token_id == [2, 0]
    granite = cfg("granite")
    assert (granite.embed_scale, granite.residual_scale, granite.logits_scale) == (6.0, 0.5, 4.0)


def _llama_rope_model(rope: dict):
    import transformers as tf

    torch.manual_seed(3)
    shape = dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return tf.LlamaForCausalLM(tf.LlamaConfig(rope_parameters=rope, **shape)).eval()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "rope_theta": 5e5,
            "beta_fast": 16,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_types_match_transformers(rope, tmp_path):
    theirs = _llama_rope_model(rope)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    config = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours = CausalLM(config)
    ours.load_hf_state_dict(theirs.state_dict())
    ids = random_ids(384, 1, 200, seed=42)
    with torch.no_grad():
        assert relative_error(ours.eval()(ids)[0], theirs(ids).logits) < 1e-5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "rope_type"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "needs low_freq_factor, high_freq_factor, original_max_position_embeddings",
        ),
        ({"hidden_act": "relu"}, "unsupported hidden_act 'relu'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_family_configs_say_what_is_missing(family_checkpoints, edit, message):
    hf = json.loads((family_checkpoints["qwen3"] / "config.json").read_text()) | edit
    with pytest.raises(ModelError, match=message) as err:
        ModelConfig.from_hf(hf)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["gemma2"])
def test_caps_bind_in_the_tiny_checkpoint(kind, family_checkpoints):
    """The soft-caps change the logits: the tests above would catch a graph that skipped them."""
    ckpt = load_checkpoint(family_checkpoints[kind])
    ids = random_ids(ckpt.config.vocab_size, 1, 60, seed=43)
    with torch.no_grad():
        capped = CausalLM.from_checkpoint(ckpt)(ids)[0]
        for switch in ("attn_softcap", "final_softcap"):
            ckpt.config = dataclasses.replace(load_checkpoint(family_checkpoints[kind]).config)
            setattr(ckpt.config, switch, 0.0)
            free = CausalLM.from_checkpoint(ckpt)(ids)[0]
            assert relative_error(free, capped) > 1e-3, switch


def test_finetune_trains_a_new_family(family_checkpoints, tmp_path, capsys):
    from models.__main__ import main
    from tests.training.test_data import write_jsonl

    talk = [
        [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", talk)
    out = tmp_path / "tuned"
    argv = ["finetune", str(family_checkpoints["qwen3"]), "--data", str(data), "--out", str(out)]
    argv += ["--no-progress", "--json", "--max-steps", "6", "--lr", "3e-3", "--eval-every", "3"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_loss_after"] < result["val_loss_before"]
    tuned, base = load_checkpoint(out), load_checkpoint(family_checkpoints["qwen3"])
    assert tuned.config == base.config
    assert any(not torch.equal(t, base.tensors[n]) for n, t in tuned.tensors.items())
