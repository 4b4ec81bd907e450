"""Small GGUF files for tests: raw tensors of any type, and a tiny Llama from an HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from safetensors.numpy import load_file

# HF -> GGUF tensor names of the Llama architecture (the way llama.cpp's converter names them)
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


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


def _gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem == "model.embed_tokens":
        return f"token_embd.{suffix}"
    if stem == "model.norm":
        return f"output_norm.{suffix}"
    if stem == "lm_head":
        return f"output.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{suffix}"


def write_tiny_llama(
    hf_dir: Path,
    path: Path,
    *,
    quant: GGMLQuantizationType = GGMLQuantizationType.F32,
    pre: str = "smollm",
    add_bos: bool = False,
) -> Path:
    """The tiny HF Llama at hf_dir as a GGUF file: 2-D weights in `quant`, norms in F32."""
    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

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

    for name, w in load_file(hf_dir / "model.safetensors").items():
        w = w.astype(np.float32)
        if ".q_proj." in name:
            w = llama_cpp_permute(w, heads)
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, kv_heads)
        qtype = quant if w.ndim == 2 else GGMLQuantizationType.F32
        writer.add_tensor(_gguf_name(name), encode(w, qtype), raw_dtype=qtype)
    _finish(writer)
    return path


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
