"""Checkpoints: read a Hugging Face folder (safetensors, sharded) or GGUF file; write HF folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.errors import ModelError, first_line, listing
from models.gguf import read_gguf, read_gguf_config
from models.lazy_tensors import LazyTensors
from models.model import ModelConfig, hf_tensor_shapes
from models.tokenizer import read_json

if TYPE_CHECKING:
    from models.tokenizer import TokenizerBundle

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_NAME = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB", as transformers counts it


@dataclass
class Checkpoint:
    config: ModelConfig
    # HF names -> tensors in the stored float dtype (float32, bfloat16, float16); a loaded
    # checkpoint reads each from its file when asked for (LazyTensors), so hold none longer
    # than needed
    tensors: Mapping[str, torch.Tensor]
    tokenizer: TokenizerBundle
    generation_config: dict[str, Any]  # generation_config.json contents ({} when absent)
    source: Path  # the folder or .gguf file
    source_files: list[Path]  # weight files, for sha256 in manifests


# -----------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | Path, base: str | Path | None = None) -> Checkpoint:
    """An HF folder, a .gguf file or a PEFT LoRA adapter folder (merged into `base`, else the
    local base its adapter_config.json names) as a Checkpoint; one-line ModelError if bad."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such checkpoint folder or file")
    from models import lora

    if lora.is_adapter(path):
        return load_adapter(path, base)
    if base is not None:
        raise ModelError(f"{path}: --base is for LoRA adapters, and this is not one")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path)
        raise ModelError(
            f"{path}: not a checkpoint (expected a Hugging Face folder or a .gguf file)"
        )
    config = read_config(path)
    tensors, files = read_weights(path, config)
    tokenizer = read_tokenizer(path, config)
    generation_file = path / GENERATION_NAME
    generation = read_json(generation_file) if generation_file.is_file() else {}
    return Checkpoint(config, tensors, tokenizer, generation, source=path, source_files=files)


def load_adapter(path: Path, base: str | Path | None = None) -> Checkpoint:
    """A PEFT LoRA adapter merged into its base checkpoint (tensors merged as they are read).

    The adapter folder's own tokenizer is used when it has one (tokenizer.json), else the base's.
    """
    from models import lora

    adapter = lora.read_adapter(path)
    base_path = lora.resolve_base(path, base, adapter)
    if lora.is_adapter(base_path):
        raise ModelError(f"{base_path}: the base is itself an adapter; give the full model")
    base_ckpt = load_checkpoint(base_path)
    config, tensors = lora.merge(base_ckpt.config, base_ckpt.tensors, adapter, base_path)
    tokenizer = base_ckpt.tokenizer
    if (path / "tokenizer.json").is_file():
        tokenizer = read_tokenizer(path, config)
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        generation_config=base_ckpt.generation_config,
        source=path,
        source_files=[*base_ckpt.source_files, path / lora.ADAPTER_WEIGHTS],
    )


def load_gguf(path: str | Path) -> Checkpoint:
    """A GGUF file as a Checkpoint (float32 tensors in HF names, dequantized when read)."""
    config = ModelConfig.from_hf(read_gguf_config(path))
    # the tensors this model needs, found under the names llama.cpp gives them
    contents = read_gguf(path, hf_names=hf_tensor_shapes(config))
    shapes = {name: contents.tensors.shape(name) for name in contents.tensors}
    check_tensors(config, shapes, contents.path)
    numpy_tensors = contents.tensors
    return Checkpoint(
        config=config,
        tensors=LazyTensors(numpy_tensors, lambda n: torch.from_numpy(numpy_tensors[n]), shapes),
        tokenizer=contents.tokenizer,
        generation_config=contents.generation_config,
        source=contents.path,
        source_files=[contents.path],
    )


def read_config(folder: Path) -> ModelConfig:
    """The folder's config.json as a ModelConfig."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ModelError(f"{folder}: not a checkpoint folder (no {CONFIG_NAME})")
    try:
        return ModelConfig.from_hf(read_json(config_file))
    except ModelError as exc:
        if str(exc).startswith(str(config_file)):
            raise
        raise ModelError(f"{config_file}: {exc}") from None


def weight_files(folder: Path) -> tuple[list[Path], Path]:
    """The safetensors files holding the weights, and the file to name in errors about them."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single], single
    if not index.is_file():
        legacy = any(folder.glob("pytorch_model*.bin"))
        hint = " (pytorch_model.bin is not supported: re-save with safetensors)" if legacy else ""
        raise ModelError(f"{folder}: no model weights ({WEIGHTS_NAME} or {INDEX_NAME}){hint}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index}: no valid weight_map")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name:
            raise ModelError(f"{index}: shard name {name!r} is not a plain file name")
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name}: shard listed in {INDEX_NAME} is missing")
        files.append(folder / name)
    return files, index


# tensors some checkpoints carry that are not parameters (GPT-2 causal-mask buffers, rotary caches)
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _hf_name(name: str, config: ModelConfig) -> str:
    """Old GPT-2 checkpoints name their tensors without the `transformer.` prefix."""
    if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def check_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]], label: Path) -> None:
    """The tensors a checkpoint holds (HF names -> shapes) are exactly the ones its config
    needs, each with the shape it needs; a one-line ModelError naming `label` otherwise."""
    expected = hf_tensor_shapes(config)
    for name, shape in shapes.items():
        if name in expected and tuple(shape) != expected[name]:
            raise ModelError(
                f"{label}: tensor {name} has shape {list(shape)}, but the config "
                f"needs {list(expected[name])}"
            )
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise ModelError(
            f"{label}: missing tensors for the {config.model_type} config: {listing(missing)}"
        )
    tied_head = "lm_head.weight" if config.tie_word_embeddings else None
    unused = [
        name
        for name in shapes
        if name not in expected and name != tied_head and not name.endswith(_BUFFER_SUFFIXES)
    ]
    if unused:
        raise ModelError(
            f"{label}: tensors the {config.model_type} config does not use: {listing(unused)}"
        )


FLOAT_DTYPES = ("F32", "BF16", "F16")  # the safetensors dtypes of weights we read


def read_weights(folder: Path, config: ModelConfig) -> tuple[LazyTensors, list[Path]]:
    """Every tensor the config needs, checked (from the files' headers) before any is read.

    The tensors are read one at a time when asked for (safetensors memory maps), so a loaded
    checkpoint costs no memory until its consumer reads it.
    """
    files, label = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, tuple[Path, str]] = {}
    for file in files:
        with _reading(file), safe_open(file, framework="pt") as f:
            for stored in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = _hf_name(stored, config)
                piece = f.get_slice(stored)
                shapes[name] = tuple(piece.get_shape())
                where[name] = (file, stored)
                dtype = piece.get_dtype()
                if dtype not in FLOAT_DTYPES and not name.endswith(_BUFFER_SUFFIXES):
                    raise ModelError(
                        f"{file}: tensor {stored} is {dtype}; weights must be one of "
                        f"{', '.join(FLOAT_DTYPES)} (quantized safetensors are not supported)"
                    )
    check_tensors(config, shapes, label)
    expected = hf_tensor_shapes(config)

    def load(name: str) -> torch.Tensor:
        file, stored = where[name]
        with _reading(file), safe_open(file, framework="pt") as f:
            return f.get_tensor(stored)

    return LazyTensors([n for n in where if n in expected], load, shapes), files


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A safetensors file that cannot be read is a one-line ModelError naming it."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{file}: corrupt safetensors file ({first_line(exc)})") from None


def read_tokenizer(folder: Path, config: ModelConfig) -> TokenizerBundle:
    """The folder's tokenizer, checked to fit the model's vocabulary."""
    from models.tokenizer import TokenizerBundle

    tokenizer = TokenizerBundle.from_hf_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(
            f"{folder / 'tokenizer.json'}: tokenizer has {tokenizer.vocab_size} tokens but the "
            f"model's vocab_size is {config.vocab_size}"
        )
    return tokenizer


# -----------------------------------------------------------------------------
# saving


def save_hf_folder(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer: TokenizerBundle | None,
    out_dir: str | Path,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an HF folder transformers loads; built in a temp folder beside out_dir, then renamed.

    A tied lm_head is saved once (as the embedding); weights larger than max_shard_bytes are split
    into shards with a model.safetensors.index.json. An existing out_dir is replaced only once the
    new folder is complete.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    state = _checked_state(config, tensors, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        hf_config = config.to_hf() | {"torch_dtype": _dtype_name(state)}
        _write_json(staging / CONFIG_NAME, hf_config)
        _write_weights(staging, state, max_shard_bytes)
        ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        generation = {k: v for k, v in ids.items() if v is not None} | (generation_config or {})
        _write_json(staging / GENERATION_NAME, generation)
        if tokenizer is not None:
            tokenizer.save(staging)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _checked_state(
    config: ModelConfig, tensors: dict[str, torch.Tensor], out: Path
) -> dict[str, torch.Tensor]:
    """The tensors to save, in model order, contiguous on the CPU, none sharing memory."""
    expected = hf_tensor_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ModelError(f"{out}: cannot save, missing tensors: {listing(missing)}")
    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, shape in expected.items():
        t = tensors[name].detach().to("cpu").contiguous()
        if tuple(t.shape) != shape:
            raise ModelError(
                f"{out}: cannot save {name} of shape {list(t.shape)}, expected {list(shape)}"
            )
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        state[name] = t
    return state


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return str(floats[0] if floats else torch.float32).removeprefix("torch.")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, removing the old target only afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
