"""Small GGUF files for tests: raw tensors of any type, and a tiny Llama from an HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import quantize
from safetensors.numpy import load_file


def write_raw_tensors(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
    arch: str = "llama",
) -> Path:
    """A GGUF with only the given tensors (each array already in its type's encoding), no metadata
    beyond the architecture."""
    writer = GGUFWriter(str(path), arch=arch)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    _finish(writer)
    return path


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """values in a GGML type's encoding, with the gguf package's own quantizer."""
    return quantize(values.astype(np.float32), qtype)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows: per head, the two rotary halves are interleaved."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_llama(
    hf_dir: Path,
    path: Path,
    *,
    quant: GGMLQuantizationType = GGMLQuantizationType.F32,
    pre: str = "smollm",
    add_bos: bool = False,
    arch: str = "llama",
) -> Path:
    """The tiny HF Llama (or Qwen2: `arch`) at hf_dir as a GGUF file: 2-D weights in `quant`,
    norms in F32; tensors named with gguf's TensorNameMap, as llama.cpp's converter names them."""
    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = GGUFWriter(str(path), arch=arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if config.get("head_dim"):  # as llama.cpp's converter writes a head_dim apart from hidden/heads
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])

    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    writer.add_eos_token_id(vocab[tok_config["eos_token"]])
    writer.add_pad_token_id(vocab[tok_config["pad_token"]])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(tok_config["chat_template"])

    arch_id = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    names = get_tensor_name_map(arch_id, config["num_hidden_layers"])
    for name, w in load_file(hf_dir / "model.safetensors").items():
        w = w.astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1  # llama.cpp stores Gemma's (1 + w) norm weights as 1 + w
        qtype = quant if w.ndim == 2 else GGMLQuantizationType.F32
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(gguf_name, encode(w, qtype), raw_dtype=qtype)
    _finish(writer)
    return path


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
