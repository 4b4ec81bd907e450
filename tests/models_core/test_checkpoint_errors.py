"""Bad checkpoint folders and files: each gives a one-line ModelError naming the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_checkpoint, save_hf_folder
from models.errors import ModelError


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _rewrite_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage_header(file: Path) -> None:
    file.write_bytes((24).to_bytes(8, "little") + b"this is not a json header" + bytes(64))


def _grow_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(50)])
    tok.save(str(folder / "tokenizer.json"))


def _shard_and_drop_one(folder: Path) -> None:
    ckpt = load_checkpoint(folder)
    save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, folder, max_shard_bytes=30_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()


# (kind, how to break the copy, text the message must contain besides the file name)
CASES: dict[str, tuple[str, Callable[[Path], object], str, str]] = {
    "no config.json": ("llama", lambda f: (f / "config.json").unlink(), "config.json", "no config"),
    "config not JSON": (
        "llama",
        lambda f: (f / "config.json").write_text("{model_type: llama"),
        "config.json",
        "JSON",
    ),
    "unknown architecture": (
        "llama",
        lambda f: _edit_config(f, model_type="bert"),
        "config.json",
        "supported: gpt2, llama, mistral, qwen2",
    ),
    "config lacks a key": (
        "gpt2",
        lambda f: _edit_config(f, n_embd=None),
        "config.json",
        "gpt2 config needs n_embd as a positive integer, got None",
    ),
    "no weights": (
        "qwen2",
        lambda f: (f / "model.safetensors").unlink(),
        "model.safetensors",
        "no model weights",
    ),
    "missing shard": ("llama", _shard_and_drop_one, "model-00002-of-", "shard listed in"),
    "bad index": (
        "llama",
        lambda f: (
            (f / "model.safetensors").unlink(),
            (f / "model.safetensors.index.json").write_text("[]"),
        ),
        "model.safetensors.index.json",
        "JSON object",
    ),
    "truncated safetensors": (
        "gpt2",
        lambda f: _truncate(f / "model.safetensors"),
        "model.safetensors",
        "corrupt",
    ),
    "garbage header": (
        "llama",
        lambda f: _garbage_header(f / "model.safetensors"),
        "model.safetensors",
        "corrupt",
    ),
    "missing tensor": (
        "llama-untied",
        lambda f: _rewrite_weights(f, lambda t: t.pop("lm_head.weight")),
        "model.safetensors",
        "missing tensors for the llama config: lm_head.weight",
    ),
    "shape mismatch": (
        "qwen2",
        lambda f: _rewrite_weights(f, lambda t: t.update({"model.norm.weight": torch.ones(32)})),
        "model.safetensors",
        "model.norm.weight has shape [32], but the config needs [64]",
    ),
    "weights of another architecture": (
        "qwen2",
        lambda f: _edit_config(f, model_type="llama"),
        "model.safetensors",
        "q_proj.bias",
    ),
    "tokenizer larger than the model": (
        "llama",
        _grow_tokenizer,
        "tokenizer.json",
        "tokenizer has 434 tokens but the model's vocab_size is 384",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_folder_gives_one_line_error_naming_the_file(tiny_checkpoints, tmp_path, case):
    kind, breaker, file_name, phrase = CASES[case]
    folder = shutil.copytree(tiny_checkpoints[kind], tmp_path / kind)
    breaker(folder)
    with pytest.raises(ModelError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert "\n" not in message
    assert file_name in message
    assert phrase in message


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_plain_file_is_not_a_checkpoint(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"weights\.bin: not a checkpoint"):
        load_checkpoint(file)


def test_gguf_path_goes_to_the_gguf_reader(tmp_path):
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(ModelError) as err:
        load_checkpoint(file)
    assert "broken.gguf" in str(err.value)
    assert "\n" not in str(err.value)


def test_legacy_pytorch_bin_is_named(tiny_checkpoints, tmp_path):
    folder = shutil.copytree(tiny_checkpoints["gpt2"], tmp_path / "gpt2")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin is not supported"):
        load_checkpoint(folder)


def test_save_to_a_file_path_is_refused(tiny_checkpoints, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(ModelError, match="taken: exists and is not a folder"):
        save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, target)
