"""PEFT LoRA adapters merged by models.lora, checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_checkpoint
from models.errors import ModelError
from models.model import CausalLM
from tests.models_core.helpers import random_ids, reference, relative_error

peft = pytest.importorskip("peft", reason="peft is a dev dependency (pyproject [dev])")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, *, base_name: str | None = None, **lora) -> torch.nn.Module:
    """A random (non-zero) LoRA adapter over `base` saved by PEFT into `out`; returns PEFT's
    merged model (merge_and_unload)."""
    torch.manual_seed(1)
    model = peft.get_peft_model(
        reference(base), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)
    )
    # modules_to_save start as copies of the base: move them so a replacement is visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config))
    return model.merge_and_unload().eval()


def assert_same_as_peft(adapter: Path, base: Path | None, merged: torch.nn.Module) -> None:
    ckpt = load_checkpoint(adapter, base)
    want = merged.state_dict()
    for name, got in ckpt.tensors.items():
        assert torch.allclose(got.float(), want[name], atol=1e-6, rtol=0), name
    ids = random_ids(ckpt.config.vocab_size, 2, 12, seed=3)
    with torch.no_grad():
        theirs = merged(ids).logits
        ours = CausalLM.from_checkpoint(ckpt)(ids)[0]
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "llama-untied"])
def test_lora_merge_equals_peft(tiny_checkpoints, tmp_path, kind):
    base = tiny_checkpoints[kind]
    merged = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=LLAMA_TARGETS
    )
    assert_same_as_peft(tmp_path / "adapter", base, merged)
    # the merge changed the weights: the adapter is not a no-op
    ids = random_ids(merged.config.vocab_size, 1, 8, seed=4)
    with torch.no_grad():
        assert relative_error(reference(base)(ids).logits, merged(ids).logits) > 1e-3


def test_rslora_and_per_module_rank_and_alpha(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["llama"]
    merged = make_adapter(
        base,
        tmp_path / "adapter",
        r=8,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32},
    )
    assert_same_as_peft(tmp_path / "adapter", base, merged)


def test_gpt2_fan_in_fan_out_and_embeddings(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["gpt2"]
    merged = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc", "wte"],
    )
    assert_same_as_peft(tmp_path / "adapter", base, merged)


def test_modules_to_save_replace_the_head(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["llama-untied"]
    merged = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    assert_same_as_peft(tmp_path / "adapter", base, merged)


def test_base_from_the_adapter_config_when_local(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["llama"]
    merged = make_adapter(
        base,
        tmp_path / "adapter",
        base_name=str(base),
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
    )
    assert_same_as_peft(tmp_path / "adapter", None, merged)
    assert (
        load_checkpoint(tmp_path / "adapter").source_files[-1].name == "adapter_model.safetensors"
    )


def test_errors_are_one_line(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["llama"]
    make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ModelError, match="names none: give it with --base BASE"):
        load_checkpoint(tmp_path / "a")
    make_adapter(
        base,
        tmp_path / "hub",
        base_name="HuggingFaceTB/SmolLM2-135M",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
    )
    with pytest.raises(ModelError, match=r"is not a local folder .* --base BASE"):
        load_checkpoint(tmp_path / "hub")
    with pytest.raises(ModelError, match="no such base checkpoint"):
        load_checkpoint(tmp_path / "a", tmp_path / "missing")
    # an adapter made for another base: a module the base lacks, or other shapes
    with pytest.raises(ModelError, match=r"which the base .* lacks"):
        load_checkpoint(tmp_path / "a", tiny_checkpoints["gpt2"])
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 8, tensors[key].shape[1])
    save_file(tensors, weights)
    with pytest.raises(ModelError, match=r"the update is \[72, 64\] but the base's weight is"):
        load_checkpoint(tmp_path / "a", base)
    with pytest.raises(ModelError, match="not one"):
        load_checkpoint(base, base)
    with pytest.raises(ModelError) as caught:
        load_checkpoint(tmp_path / "a", tiny_checkpoints["gpt2"])
    assert "\n" not in str(caught.value)


def test_dora_is_refused(tiny_checkpoints, tmp_path):
    make_adapter(tiny_checkpoints["llama"], tmp_path / "a", r=4, target_modules=["q_proj"])
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_dora": True}))
    with pytest.raises(ModelError, match="DoRA"):
        load_checkpoint(tmp_path / "a", tiny_checkpoints["llama"])
