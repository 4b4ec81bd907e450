"""GGUF file (llama.cpp) -> HF config, HF-named float tensors (read when asked for), tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from models.config import ARCHITECTURES as HF_CLASSES
from models.errors import ModelError
from models.lazy_tensors import LazyTensors
from models.tokenizer import TokenizerBundle

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

# GGUF general.architecture -> transformers model_type. Tensor names are mapped with the gguf
# package's own TensorNameMap (the table llama.cpp's converter names them with); whether a
# model_type is supported is models.model's call (ModelConfig.from_hf names what is missing).
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_PERMUTED_QK = ("llama",)  # llama.cpp's converter interleaves the rotary halves of q/k rows
_NORMS_PLUS_ONE = ("gemma", "gemma2", "gemma3")  # and stores Gemma's (1 + w) norms as 1 + w

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
    tensors: Mapping[str, np.ndarray]  # HF names; each dequantized when read (LazyTensors)
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


def read_tensor_data(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """A tensor's stored data read from the file into memory (a plain read, not the reader's
    memory map, whose pages would stay resident: a streamed export reads each tensor once)."""
    raw = np.fromfile(
        path, dtype=np.uint8, count=int(tensor.n_bytes), offset=int(tensor.data_offset)
    )
    if raw.nbytes != tensor.data.nbytes:
        raise ModelError(f"{path}: truncated GGUF file (tensor {tensor.name} is cut short)")
    return raw.view(tensor.data.dtype).reshape(tensor.data.shape)


def dequantize(tensor: ReaderTensor, path: Path, data: np.ndarray | None = None) -> np.ndarray:
    """A tensor (`data`: its stored data, else the reader's memory map) as float32 in numpy
    (row-major, HF) shape; ModelError for a type we cannot read."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    stored = tensor.data if data is None else data
    values = None
    if qtype.name not in _INTEGER_TYPES:
        with contextlib.suppress(NotImplementedError):
            values = gguf_dequantize(stored, qtype)
    if values is None:
        raise ModelError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which cannot be dequantized "
            f"(supported: {', '.join(supported_tensor_types())})"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 comes back as a view of the memory-mapped file: copy it out
    return values.copy() if np.may_share_memory(values, stored) else values


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


def name_map(arch: str, blocks: int, hf_names: Iterable[str]) -> dict[str, str]:
    """GGUF name -> HF name for the HF tensors a model of `arch` needs, named as llama.cpp's
    converter names them (the gguf package's TensorNameMap); names it does not map are left out."""
    import gguf

    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(arch_id, blocks)
    mapped = {}
    for hf in hf_names:
        name = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is not None:
            mapped[name] = hf
    return mapped


# ---- config ------------------------------------------------------------------------------------
def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelError(f"{path}: GGUF metadata lacks {key}")
    return meta[key]


def hf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """A transformers config dict from the `{arch}.*` metadata of a supported architecture."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensor_names:
        raise ModelError(f"{path}: rope scaling ({scaling or 'rope_freqs'}) is not supported")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        return _require(meta, full, path) if required else meta.get(full, default)

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ModelError(f"{path}: GGUF metadata gives no vocabulary size")
    rope_theta = float(key("rope.freq_base", 10000.0))
    model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [HF_CLASSES.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "num_hidden_layers": int(key("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", required=True)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "gelu_pytorch_tanh" if arch in _NORMS_PLUS_ONE else "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if (window := key("attention.sliding_window")) is not None:
        config["sliding_window"] = int(window)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := key(name)) is not None:
            config[name] = float(value)
    if arch in ("gemma2", "gemma3"):
        config["query_pre_attn_scalar"] = head_dim
    if arch == "gemma3":  # llama.cpp's fixed local base and pattern for Gemma 3
        config["rope_local_base_freq"] = 10000.0
        config["sliding_window_pattern"] = 6
    if arch == "phi3" and (dims := key("rope.dimension_count")) is not None:
        config["partial_rotary_factor"] = int(dims) / head_dim
    return config


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
def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """Only the transformers config dict of a GGUF file (ModelError if bad)."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
    except Exception as exc:
        raise ModelError(f"{path}: corrupt GGUF metadata ({_short(exc)})") from None
    return hf_config(meta, {t.name for t in reader.tensors}, path)


def read_gguf(path: str | Path, hf_names: Iterable[str] | None = None) -> GGUFModel:
    """A GGUF file's config dict, tokenizer and tensors in HF names (ModelError if bad).

    `hf_names`: the HF tensors the model needs (models.model knows them), each found under the
    name llama.cpp's converter gives it; None: the architecture's usual Llama-style names. The
    tensors are dequantized when asked for (the file stays memory-mapped); every tensor's type
    is checked here.
    """
    path = Path(path)
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
    except Exception as exc:
        raise ModelError(f"{path}: corrupt GGUF metadata ({_short(exc)})") from None
    names = {t.name for t in reader.tensors}
    config = hf_config(meta, names, path)
    arch, blocks = meta["general.architecture"], config["num_hidden_layers"]
    tokenizer = gguf_tokenizer(meta, path)
    if hf_names is None:
        hf_names = _usual_hf_names(blocks)
    mapping = name_map(arch, blocks, hf_names)
    by_name = {t.name: t for t in reader.tensors}
    supported = supported_tensor_types()
    from gguf import GGMLQuantizationType

    for tensor in reader.tensors:
        if tensor.name not in mapping:
            raise ModelError(f"{path}: tensor {tensor.name} has no {arch} equivalent")
        qtype = GGMLQuantizationType(tensor.tensor_type).name
        if qtype not in supported:
            raise ModelError(
                f"{path}: tensor {tensor.name} has type {qtype}, which cannot be dequantized "
                f"(supported: {', '.join(supported)})"
            )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hf_to_gguf = {hf: g for g, hf in mapping.items() if g in by_name}

    def load(hf: str) -> np.ndarray:
        tensor = by_name[hf_to_gguf[hf]]
        values = dequantize(tensor, path, read_tensor_data(tensor, path))
        if arch in _PERMUTED_QK and ".attn_q." in tensor.name:
            values = _unpermute_rows(values, heads)
        elif arch in _PERMUTED_QK and ".attn_k." in tensor.name:
            values = _unpermute_rows(values, kv_heads)
        elif arch in _NORMS_PLUS_ONE and hf.endswith("norm.weight"):
            values = values - np.float32(1.0)
        return values

    shapes = {hf: tuple(int(d) for d in reversed(by_name[g].shape)) for hf, g in hf_to_gguf.items()}
    tensors = LazyTensors(list(hf_to_gguf), load, shapes)
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


def _usual_hf_names(blocks: int) -> list[str]:
    """The HF names of a Llama-style model (with the biases and q/k norms some families have)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    parts = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.{s}" for p in "qkvo" for s in ("weight", "bias")),
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    return names + [f"model.layers.{i}.{p}" for i in range(blocks) for p in parts]
