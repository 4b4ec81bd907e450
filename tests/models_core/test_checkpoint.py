"""Reading and writing Hugging Face checkpoint folders, checked against transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_checkpoint, save_hf_folder
from models.model import CausalLM
from tests.models_core.helpers import KINDS, random_ids, reference, relative_error


def _stored_names(folder) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_reads_the_folder(tiny_checkpoints, kind):
    folder = tiny_checkpoints[kind]
    ckpt = load_checkpoint(folder)
    hf = json.loads((folder / "config.json").read_text())
    assert ckpt.config.model_type == hf["model_type"]
    assert ckpt.config.vocab_size == hf["vocab_size"]
    assert set(ckpt.tensors) == _stored_names(folder)
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    assert ckpt.generation_config["eos_token_id"] == 2
    assert ckpt.tokenizer.eos_token == "<|im_end|>"
    assert ckpt.source == folder
    assert ckpt.source_files == [folder / WEIGHTS_NAME]


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_loads_in_transformers_with_the_same_logits(tiny_checkpoints, tmp_path, kind):
    import transformers

    ckpt = load_checkpoint(tiny_checkpoints[kind])
    out = save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, tmp_path / "saved")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids = random_ids(ckpt.config.vocab_size, 1, 17, seed=20)
    with torch.no_grad():
        want = reference(tiny_checkpoints[kind])(ids).logits
        assert relative_error(theirs.eval()(ids).logits, want) < 1e-6
        assert relative_error(CausalLM.from_checkpoint(load_checkpoint(out))(ids)[0], want) < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert config["architectures"] == [type(theirs).__name__]
    # a tied head is stored once, as the embedding
    assert ("lm_head.weight" in _stored_names(out)) == (not ckpt.config.tie_word_embeddings)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello there! 🙂 <|im_end|>"
    assert tokenizer(text, add_special_tokens=False).input_ids == ckpt.tokenizer.encode(text)


def test_sharded_save_loads_in_ours_and_transformers(tiny_checkpoints, tmp_path):
    import transformers

    ckpt = load_checkpoint(tiny_checkpoints["qwen2"])
    out = save_hf_folder(
        ckpt.config, ckpt.tensors, ckpt.tokenizer, tmp_path / "sharded", max_shard_bytes=100_000
    )
    assert not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(ckpt.tensors)
    total = sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    assert index["metadata"]["total_size"] == total

    again = load_checkpoint(out)
    assert again.source_files == [out / s for s in shards]
    assert all(torch.equal(again.tensors[k], v) for k, v in ckpt.tensors.items())
    ids = random_ids(ckpt.config.vocab_size, 1, 11, seed=21)
    with torch.no_grad():
        want = CausalLM.from_checkpoint(ckpt)(ids)[0]
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert relative_error(theirs(ids).logits, want) < 1e-5


def test_save_writes_generation_config_and_model_dtype(tiny_checkpoints, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    half = {k: v.to(torch.bfloat16) for k, v in ckpt.tensors.items()}
    out = save_hf_folder(
        ckpt.config, half, ckpt.tokenizer, tmp_path / "bf16", {"max_new_tokens": 64}
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_new_tokens": 64,
    }
    again = load_checkpoint(out)
    assert again.tensors["model.norm.weight"].dtype == torch.bfloat16


def test_save_replaces_an_existing_folder(tiny_checkpoints, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoints["gpt2"])
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert (out / WEIGHTS_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_save_leaves_the_old_folder_and_no_temp_files(tiny_checkpoints, tmp_path):
    class BrokenTokenizer:
        def save(self, out_dir):
            raise RuntimeError("disk full")

    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf_folder(ckpt.config, ckpt.tensors, BrokenTokenizer(), out)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_save_rejects_missing_tensors(tiny_checkpoints, tmp_path):
    from models.errors import ModelError

    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    tensors = dict(ckpt.tensors)
    del tensors["model.norm.weight"]
    with pytest.raises(ModelError, match=r"model\.norm\.weight"):
        save_hf_folder(ckpt.config, tensors, ckpt.tokenizer, tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_model_weights_save_through_hf_state_dict(tiny_checkpoints, tmp_path):
    """A trained CausalLM is saved via hf_state_dict() and loads back unchanged."""
    ckpt = load_checkpoint(tiny_checkpoints["llama-untied"])
    model = CausalLM.from_checkpoint(ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    out = save_hf_folder(model.config, model.hf_state_dict(), ckpt.tokenizer, tmp_path / "m")
    again = load_checkpoint(out)
    assert torch.equal(again.tensors["lm_head.weight"], ckpt.tensors["lm_head.weight"] * 2.0)


def test_gpt2_names_without_prefix_and_mask_buffers_load(tiny_checkpoints, tmp_path):
    """Original GPT-2 checkpoints name tensors without `transformer.` and store mask buffers."""
    from safetensors.torch import save_file

    folder = shutil.copytree(tiny_checkpoints["gpt2"], tmp_path / "gpt2")
    before = dict(load_checkpoint(folder).tensors)  # read now: the file is replaced below
    old = {k.removeprefix("transformer."): v for k, v in before.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    save_file(old, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    again = load_checkpoint(str(folder))
    assert set(again.tensors) == set(before)
    assert all(torch.equal(again.tensors[k], v) for k, v in before.items())
