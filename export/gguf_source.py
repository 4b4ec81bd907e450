"""A GGUF file -> ExportSource with numpy and the gguf package: the build without torch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import sha256_file
from export.weights import ExportSource, SourceFile


def llama_tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes a Llama-family checkpoint of `config` holds (a tied
    lm_head absent): what models.model.hf_tensor_shapes gives, computed without torch."""
    if config.family != "llama":
        raise ValueError(f"not a Llama-family config: {config.model_type}")
    hidden, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (q, hidden),
            layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden),
            layer + "self_attn.o_proj.weight": (hidden, q),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "mlp.gate_proj.weight": (inter, hidden),
            layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
        }
        if config.attention_bias:  # q/k/v; a Llama's o_proj too (as transformers)
            shapes |= {
                layer + "self_attn.q_proj.bias": (q,),
                layer + "self_attn.k_proj.bias": (kv,),
                layer + "self_attn.v_proj.bias": (kv,),
            }
            if config.model_type == "llama":
                shapes[layer + "self_attn.o_proj.bias"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _check_shapes(config: Any, tensors: dict[str, np.ndarray], path: Path) -> None:
    from models.errors import ModelError, listing

    expected = llama_tensor_shapes(config)
    for name, values in tensors.items():
        if name in expected and values.shape != expected[name]:
            raise ModelError(
                f"{path}: tensor {name} has shape {list(values.shape)}, but the config needs "
                f"{list(expected[name])}"
            )
    unused = [n for n in tensors if n not in expected and n != "lm_head.weight"]
    missing = [n for n in expected if n not in tensors]
    if missing or unused:
        what = f"missing {listing(missing)}" if missing else f"unused {listing(unused)}"
        raise ModelError(f"{path}: tensors do not fit the llama config: {what}")


def load_gguf_source(path: str | Path, generation: Mapping[str, Any] | None = None) -> ExportSource:
    """A Llama GGUF file as an ExportSource (float32 numpy tensors in HF names), torch-free;
    `generation` is merged over the file's generation settings. ModelError on bad input."""
    from models.errors import ModelError

    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{path}: the build without torch reads .gguf files only")
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    stat = path.stat()
    src = _read(path.resolve(), stat.st_size, stat.st_mtime_ns)
    return dataclasses.replace(
        src,
        tensors=dict(src.tensors),
        generation_config={**src.generation_config, **(generation or {})},
        source=path,
    )


@functools.lru_cache(maxsize=1)
def _read(path: Path, size: int, mtime_ns: int) -> ExportSource:
    """One read per file version: ensure-default builds up to three precisions from it."""
    from models.config import ModelConfig
    from models.gguf import read_gguf

    contents = read_gguf(path)
    config = ModelConfig.from_hf(contents.hf_config)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in contents.tensors.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    _check_shapes(config, tensors, path)
    return ExportSource(
        config=config,
        tensors=tensors,
        tokenizer=contents.tokenizer,
        generation_config=contents.generation_config,
        source=path,
        source_files=[SourceFile(path, size, sha256_file(path))],
    )
