"""GGUF file (llama.cpp, Llama architecture) -> HF config, HF-named float tensors, tokenizer."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from models.errors import ModelError
from models.tokenizer import TokenizerBundle

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names -> HF names. Per layer: blk.N.<key>.{weight,bias} -> model.layers.N.<value>.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Byte-level BPE pre-tokenization, keyed by tokenizer.ggml.pre. None: GPT-2's own ByteLevel regex.
# transformers uses that for "smollm" too; SmolLM2's vocabulary has no merge joining a digit to
# anything, so it gives the same ids as llama.cpp's digit-isolating "smollm" split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # never the weights of a Llama


@dataclass
class GGUFModel:
    """What a GGUF file holds, in Hugging Face terms (numpy tensors; torch-free)."""

    path: Path
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: TokenizerBundle
    generation_config: dict[str, Any] = field(default_factory=dict)


# ---- reading -----------------------------------------------------------------------------------
def open_gguf(path: Path) -> GGUFReader:
    """A GGUFReader over `path`; ModelError for a missing, corrupt or truncated file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises many kinds on corrupt input
        raise ModelError(f"{path}: corrupt or truncated GGUF file ({_short(exc)})") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ModelError(f"{path}: truncated GGUF file (tensor {tensor.name} is cut short)")
    return reader


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def dequantize(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """A tensor as float32 in numpy (row-major, HF) shape; ModelError for a type we cannot read."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    values = None
    if qtype.name not in _INTEGER_TYPES:
        with contextlib.suppress(NotImplementedError):
            values = gguf_dequantize(tensor.data, qtype)
    if values is None:
        raise ModelError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which cannot be dequantized "
            f"(supported: {', '.join(supported_tensor_types())})"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 comes back as a view of the memory-mapped file: copy it out
    return values.copy() if np.may_share_memory(values, tensor.data) else values


@lru_cache(maxsize=1)
def supported_tensor_types() -> tuple[str, ...]:
    """Names of the GGML tensor types we dequantize: those the gguf package decodes (probed on one
    zero block each)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    supported = []
    for qtype in GGMLQuantizationType:
        if qtype.name in _INTEGER_TYPES or qtype not in GGML_QUANT_SIZES:
            continue
        try:
            gguf_dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.append(qtype.name)
    return tuple(supported)


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves the two rotary halves of each head
    (rows h*d + 2i, 2i+1 hold HF rows h*d + i, h*d + d/2 + i); HF keeps the halves apart."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor of the Llama architecture, or None if it has none."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{suffix}"
    return None


# ---- config ------------------------------------------------------------------------------------
def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelError(f"{path}: GGUF metadata lacks {key}")
    return meta[key]


def llama_hf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """A transformers LlamaConfig dict from llama.* metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    scaling = meta.get("llama.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensor_names:
        raise ModelError(f"{path}: rope scaling ({scaling or 'rope_freqs'}) is not supported")
    hidden = int(_require(meta, "llama.embedding_length", path))
    heads = int(_require(meta, "llama.attention.head_count", path))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ModelError(f"{path}: GGUF metadata gives no vocabulary size")
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_require(meta, "llama.context_length", path)),
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _check_tensors(names: set[str], config: dict[str, Any], path: Path) -> None:
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(config["num_hidden_layers"]):
        required += [f"blk.{i}.{key}.weight" for key in _LAYER_NAMES]
    missing = [n for n in required if n not in names]
    if missing:
        raise ModelError(f"{path}: GGUF file lacks tensor {missing[0]} ({len(missing)} missing)")


# ---- tokenizer ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_spelling(token: str) -> str:
    """Tokens are stored in the byte alphabet; respell the few that are not (raw text)."""
    table = _byte_alphabet()
    alphabet = set(table.values())
    if set(token) <= alphabet:
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


def _pre_tokenizer(pre: str | None, path: Path) -> pre_tokenizers.PreTokenizer:
    key = pre or "default"
    if key not in PRE_TOKENIZER_SPLITS:
        raise ModelError(
            f"{path}: GGUF pre-tokenizer {key!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})"
        )
    split = PRE_TOKENIZER_SPLITS[key]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> TokenizerBundle:
    """The byte-level BPE tokenizer and chat template described by tokenizer.ggml.* metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, "
            "byte-level BPE)"
        )
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges", path)]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    vocab = {_byte_level_spelling(token): i for i, token in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:
        raise ModelError(f"{path}: inconsistent BPE vocabulary/merges ({_short(exc)})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()

    alphabet = set(_byte_alphabet().values())
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED and t in vocab
        ]
    )

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        tok.post_processor = _bos_eos_processor(
            tok, bos if add_bos else None, eos if add_eos else None
        )
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    return TokenizerBundle(
        tokenizer=tok,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
        unk_token=token_at("unknown_token_id"),
        pad_token=token_at("padding_token_id"),
        model_max_length=int(context) if context else None,
    )


def _bos_eos_processor(
    tokenizer: Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """The post-processor transformers builds from tokenizer.ggml.add_bos_token/add_eos_token:
    `bos` before and `eos` after each sequence (None: nothing)."""

    def around(sequence: str, type_id: int) -> list[str]:
        head = [f"{bos}:{type_id}"] if bos else []
        tail = [f"{eos}:{type_id}"] if eos else []
        return [*head, f"${sequence}:{type_id}", *tail]

    specials = dict.fromkeys((t, tokenizer.token_to_id(t)) for t in (bos, eos) if t)
    return processors.TemplateProcessing(
        single=around("A", 0), pair=around("A", 0) + around("B", 1), special_tokens=list(specials)
    )


# ---- entry points ------------------------------------------------------------------------------
def read_gguf(path: str | Path) -> GGUFModel:
    """Read and dequantize a Llama GGUF file into HF names and a config dict (ModelError if bad)."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
    except Exception as exc:
        raise ModelError(f"{path}: corrupt GGUF metadata ({_short(exc)})") from None
    names = {t.name for t in reader.tensors}
    config = llama_hf_config(meta, names, path)
    _check_tensors(names, config, path)
    tokenizer = gguf_tokenizer(meta, path)

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ModelError(f"{path}: tensor {tensor.name} has no Llama equivalent")
        values = dequantize(tensor, path)
        if ".attn_q." in tensor.name:
            values = _unpermute_rows(values, heads)
        elif ".attn_k." in tensor.name:
            values = _unpermute_rows(values, kv_heads)
        tensors[name] = values

    if tokenizer.vocab_size > config["vocab_size"]:  # tensor shapes: load_checkpoint checks them
        raise ModelError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config['vocab_size']}"
        )
    generation = {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config[k] is not None
    }
    return GGUFModel(path, config, tensors, tokenizer, generation)
