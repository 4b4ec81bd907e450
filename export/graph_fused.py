"""The fused decoding graph: GroupQueryAttention on shared KV buffers, last-position logits."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.manifest import PRECISIONS
from export.onnx_graph import GraphWriter
from export.quantize import (
    BITS,
    BlockQuantized,
    on_symmetric_grid,
    quantize_affine,
    quantize_blockwise,
)

BLOCK_SIZE = 32
# MatMulNBits with int8 activations (per block of 32, as llama.cpp's Q8_1): the only fast CPU
# path of ORT 1.31 on AVX2; level 1 (float activations) is exact but slower than fp32 MatMul
# (docs/performance.md, "Faithful quantization")
ACCURACY_LEVEL = 4
SYMMETRIC = False  # int8: zero points per block: closer to fp32 than symmetric


class Source(Protocol):
    """What the builder reads: export.weights.ExportSource (config, float32 tensors, HF names)."""

    config: Any
    tensors: dict[str, np.ndarray]


class FusedWriter(GraphWriter):
    """The graph writer plus the layers whose form depends on the precision: linears
    (MatMul or MatMulNBits), the embedding table and the head."""

    def __init__(self, precision: str) -> None:
        super().__init__(np.float16 if precision == "fp16" else np.float32)
        self.precision = precision
        self.onnx_float = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT

    def linear(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """y = x @ w.T (+ bias) for a [out, in] weight, as MatMul or MatMulNBits by precision."""
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        if self.precision in BITS:
            q = quantize_weight(w, self.precision)
            inputs = [
                x,
                self.const(f"{name}.qweight", q.packed),
                self.const(f"{name}.scales", q.scales),
            ]
            if q.zero_points is not None:
                inputs.append(self.const(f"{name}.zero_points", q.zero_points))
            attrs = dict(K=k, N=n, bits=q.bits, block_size=q.block_size)
            attrs["accuracy_level"] = ACCURACY_LEVEL
            y = self.op("MatMulNBits", inputs, name, **attrs)
            if q.offsets is not None:
                y = self._add_offsets(x, y, q, name)
        else:
            y = self.op("MatMul", [x, self.weight(f"{name}.weight_t", w.T)], name)
        if bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", bias)], f"{name}/bias")
        return y

    def _add_offsets(self, x: str, y: str, q: BlockQuantized, name: str) -> str:
        """y + (block sums of x) @ offsets.T: what integer zero points leave of an affine
        weight's block minimum, in float, as two small MatMuls (K -> K/block -> N) and an Add."""
        sums = f"block_sums.{q.k}x{q.block_size}"  # one indicator matrix per K, shared
        if sums not in self._names:
            k_blocks = q.offsets.shape[1]
            indicator = np.zeros((q.k, k_blocks), np.float32)
            indicator[np.arange(q.k), np.arange(q.k) // q.block_size] = 1.0
            self.const(sums, indicator)
        s = self.op("MatMul", [x, sums], f"{name}/block_sums")
        offsets_t = self.const(f"{name}.offsets_t", np.ascontiguousarray(q.offsets.T))
        c = self.op("MatMul", [s, offsets_t], f"{name}/offsets")
        return self.op("Add", [y, c], f"{name}/with_offsets")

    def embedding(self, ids: str, table: np.ndarray, name: str) -> tuple[str, str | None]:
        """Rows of a [vocab, hidden] table; returns (output, the float table initializer or None).

        int8/int4 store the table block-quantized (GatherBlockQuantized): a quarter or an eighth
        of the float32 bytes. It is read a few rows per step, so this saves memory, not time.
        """
        if self.precision in BITS:
            q = quantize_table(table, self.precision)
            vocab = q.n
            inputs = [
                self.const(f"{name}.qweight", q.packed.reshape(vocab, -1)),
                ids,
                self.const(f"{name}.scales", q.scales.reshape(vocab, -1)),
            ]
            if q.zero_points is not None:
                inputs.append(self.const(f"{name}.zero_points", q.zero_points.reshape(vocab, -1)))
            attrs = dict(gather_axis=0, quantize_axis=1, block_size=q.block_size, bits=q.bits)
            y = self.op("GatherBlockQuantized", inputs, name, **attrs)
            return y, None
        weight = self.weight(f"{name}.weight", table)
        y = self.op("Gather", [weight, ids], name)
        return y, weight

    def lm_head(self, x: str, w: np.ndarray, name: str, tied_to: str | None = None) -> str:
        """logits [batch, vocab] from x [batch, hidden] and a [vocab, hidden] weight.

        Float precisions use Gemm(transB=1) on the weight as stored, so a head tied to the
        embedding table (`tied_to`, its initializer name) reuses that initializer.
        """
        if self.precision in BITS:
            return self.linear(x, w, name)
        weight = tied_to or self.weight(f"{name}.weight", w)
        y = self.op("Gemm", [x, weight], name, transB=1)
        return y


def quantize_weight(w: np.ndarray, precision: str) -> BlockQuantized:
    """The MatMulNBits weight of a linear layer at int8/int4.

    A weight that already lies on a quantization grid keeps it exactly: a dequantized Q8_0
    tensor (GGUF) stays symmetric 8-bit, whatever the precision (int4 would re-round it); int4
    is `scale * q + offset` per block (quantize_affine: Q4_1 blocks exactly, others rounded
    between their min and max); int8 is asymmetric 8-bit.
    """
    if on_symmetric_grid(w, bits=8, block_size=BLOCK_SIZE):
        return quantize_blockwise(w, bits=8, block_size=BLOCK_SIZE, symmetric=True)
    if precision == "int4":
        return quantize_affine(w, bits=4, block_size=BLOCK_SIZE)
    return quantize_blockwise(w, bits=BITS[precision], block_size=BLOCK_SIZE, symmetric=SYMMETRIC)


def quantize_table(table: np.ndarray, precision: str) -> BlockQuantized:
    """The GatherBlockQuantized table of an embedding (integer zero points only): exact 8-bit
    for a Q8_0 table, else block-wise at the precision's bits."""
    if on_symmetric_grid(table, bits=8, block_size=BLOCK_SIZE):
        return quantize_blockwise(table, bits=8, block_size=BLOCK_SIZE, symmetric=True)
    bits = BITS[precision]
    return quantize_blockwise(table, bits=bits, block_size=BLOCK_SIZE, symmetric=SYMMETRIC)


def _check(src: Source, precision: str, max_context: int) -> None:
    """One-line ValueError for what the graph cannot express."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cfg = src.config
    if cfg.family not in ("llama", "gpt2"):
        raise ValueError(f"unsupported family {cfg.family!r}; supported: llama, gpt2")
    if not 1 <= max_context <= cfg.max_position_embeddings:
        raise ValueError(
            f"max_context must be in 1..{cfg.max_position_embeddings} "
            f"(the model's max_position_embeddings), got {max_context}"
        )
    multiple = 16 if cfg.family == "llama" else 8  # ORT's GQA: 8, and 16 with rotary
    if cfg.head_dim % multiple:
        raise ValueError(
            f"GroupQueryAttention needs head_dim % {multiple} == 0, got {cfg.head_dim}"
        )
    if precision in BITS and cfg.hidden_size % BLOCK_SIZE:
        # GatherBlockQuantized would return the padded width of a partial last block
        raise ValueError(f"{precision} needs hidden_size divisible by {BLOCK_SIZE}")


def rotary_caches(
    head_dim: int, theta: float, max_context: int, inv_freq: np.ndarray | None = None,
    attention_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """cos/sin [max_context, dims/2] for the rotate-half (non-interleaved) rotary of Llama:
    plain RoPE over head_dim at `theta`, or the given inverse frequencies of a scaled rope
    (models.rope), with its attention factor folded in (it scales q and k alike)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(max_context, dtype=np.float64), inv_freq.astype(np.float64))
    return np.cos(angles) * attention_factor, np.sin(angles) * attention_factor


def _inputs_outputs(cfg: Any, g: FusedWriter, max_context: int) -> tuple[list, list]:
    kv_shape = ["batch", cfg.num_kv_heads, max_context, cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    if cfg.family == "gpt2":
        inputs.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])
        )
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("last_index", TensorProto.INT64, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])
    ]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.onnx_float, kv_shape)
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", g.onnx_float, kv_shape)
            )
    return inputs, outputs


def _packed_qkv(
    cfg: Any, weight: np.ndarray, bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """q|k|v weight [out, in] (and bias) with the softmax scale 1/sqrt(head_dim) folded into q.

    With GQA's `scale` at 1.0, ORT's CPU kernel computes a decode step's Q.K' with MLAS's
    one-row kernel; any other scale sends it through the general SGEMM, which copies and
    transposes every head's whole K cache on every step (the cost grows with the context).
    Rotary is a rotation, so scaling q before it is the same as scaling the scores after.
    """
    q_rows = cfg.num_heads * cfg.head_dim
    scale = np.asarray(getattr(cfg, "softmax_scale", cfg.head_dim**-0.5), weight.dtype)
    weight = weight.copy()
    weight[:q_rows] *= scale
    if bias is not None:
        bias = bias.copy()
        bias[:q_rows] *= scale
    return weight, bias


def attention(
    g: FusedWriter,
    cfg: Any,
    i: int,
    qkv: str | list[str],
    rotary: bool | str,
    window: int = 0,
    softcap: float = 0.0,
) -> str:
    """GroupQueryAttention on packed QKV (or [q, k, v]); reads and writes layer i's shared KV
    buffer in place. `rotary`: False, True (the caches `cos_cache`/`sin_cache`) or the suffix
    of another pair of caches; `window` > 0: keys a query sees, itself included; `softcap` > 0:
    scores -> cap * tanh(scores / cap)."""
    q, k, v = (qkv, "", "") if isinstance(qkv, str) else qkv
    suffix = "" if rotary is True else f".{rotary}"
    attrs: dict[str, Any] = {}
    if window:
        attrs["local_window_size"] = window  # the same count as transformers (measured)
    if softcap:
        attrs["softcap"] = float(softcap)
    out, _, _ = g.node(
        "GroupQueryAttention",
        [
            q,
            k,
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "seqlens_k",
            "total_sequence_length",
            f"cos_cache{suffix}" if rotary else "",
            f"sin_cache{suffix}" if rotary else "",
        ],
        f"layers.{i}.attn",
        outputs=3,
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        do_rotary=int(bool(rotary)),
        rotary_interleaved=0,
        scale=1.0,  # the softmax scale is folded into the q rows: see _packed_qkv
        **attrs,
    )
    # name the present outputs as the contract says (GQA's 2nd/3rd outputs)
    g.nodes[-1].output[1] = f"present.{i}.key"
    g.nodes[-1].output[2] = f"present.{i}.value"
    return out


def _last_positions(g: FusedWriter, names: list[str]) -> list[str]:
    """Keep only the position whose logits are needed in each row: `last_index[row]`.

    The runner says which position that is (a right-padded row's last real token, or seq - 1),
    so no node derives it from shapes: a Shape -> Gather chain would be placed on the CPU by the
    CUDA provider and its host copy would forbid CUDA-graph capture.
    """
    idx = g.op("Unsqueeze", ["last_index", g.ints("last/axes", [1])], "last/idx")  # [batch, 1]
    return [g.op("GatherND", [n, idx], f"{n}/last", batch_dims=1) for n in names]  # [batch, H]


def _norm_weight(cfg: Any, w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """An RMSNorm's effective weight: (offset + w) (Gemma's 1 + w), times a folded scale."""
    return (np.asarray(w, np.float32) + np.float32(cfg.norm_offset)) * np.float32(scale)


def _rms(g: FusedWriter, x: str, w: np.ndarray, eps: float, name: str) -> str:
    weight = g.weight(f"{name}.weight", w)
    return g.op("SimplifiedLayerNormalization", [x, weight], name, epsilon=eps, axis=-1)


def _rope_caches(g: FusedWriter, cfg: Any, max_context: int) -> dict[float, bool | str]:
    """One cos/sin cache pair per rope theta of the layers: theta -> GQA's `rotary` argument."""
    which: dict[float, bool | str] = {0.0: False}
    for i in range(cfg.num_layers):
        theta = cfg.layer_rope(i)
        if theta in which:
            continue
        inv_freq, factor = cfg.rope_frequencies(theta)
        cos, sin = rotary_caches(cfg.head_dim, theta, max_context, inv_freq, factor)
        suffix = "" if len(which) == 1 else f".{len(which) - 1}"
        g.weight(f"cos_cache{suffix}", cos)
        g.weight(f"sin_cache{suffix}", sin)
        which[theta] = True if not suffix else suffix[1:]
    return which


def _qkv(g: FusedWriter, cfg: Any, t: dict[str, np.ndarray], i: int, h: str) -> str | list[str]:
    """Layer i's q, k, v: packed (the softmax scale folded into the q rows), or with q/k norms
    [q, k, v] (the scale folded into the q norm's weight)."""
    a = f"model.layers.{i}.self_attn."
    if cfg.fused_projections:
        wqkv, bias = t[a + "qkv_proj.weight"], t.get(a + "qkv_proj.bias")
    else:
        wqkv = np.concatenate(
            [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]
        )
        bias = None
        if cfg.attention_bias:
            bias = np.concatenate(
                [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]
            )
    if not cfg.qk_norm:
        wqkv, bias = _packed_qkv(cfg, wqkv, bias)
        return g.linear(h, wqkv, f"layers.{i}.qkv_proj", bias)
    qkv = g.linear(h, wqkv, f"layers.{i}.qkv_proj", bias)
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = g.const(f"layers.{i}.qkv_sizes", np.array([q_dim, kv_dim, kv_dim], np.int64))
    q, k, v = g.node("Split", [qkv, sizes], f"layers.{i}.qkv", outputs=3, axis=-1)
    eps = float(cfg.norm_eps)
    normed = []
    for x, kind, scale in ((q, "q", cfg.softmax_scale), (k, "k", 1.0)):
        w = _norm_weight(cfg, t[a + f"{kind}_norm.weight"], scale)
        name = f"layers.{i}.{kind}_norm"
        if cfg.qk_norm == "head":
            heads = g.ints(f"{name}/heads", [0, 0, -1, cfg.head_dim])
            x = g.op("Reshape", [x, heads], f"{name}/split")
            x = _rms(g, x, w, eps, name)
            x = g.op("Reshape", [x, g.ints(f"{name}/flat", [0, 0, -1])], f"{name}/merged")
        else:
            x = _rms(g, x, w, eps, name)
        normed.append(x)
    return [*normed, v]


def _mlp(g: FusedWriter, cfg: Any, t: dict[str, np.ndarray], i: int, h: str) -> str:
    m = f"model.layers.{i}.mlp."
    if cfg.fused_projections:
        w_gu = t[m + "gate_up_proj.weight"]
    else:
        w_gu = np.concatenate([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]])
    gu = g.linear(h, w_gu, f"layers.{i}.gate_up_proj")
    half = g.const(f"layers.{i}.split", np.array([cfg.intermediate_size] * 2, np.int64))
    gate, up = g.node("Split", [gu, half], f"layers.{i}.gate_up", outputs=2, axis=-1)
    if cfg.hidden_act == "gelu_tanh":
        act = g.op("FastGelu", [gate], f"layers.{i}.gelu")
    else:
        sig = g.op("Sigmoid", [gate], f"layers.{i}.sigmoid")
        act = g.op("Mul", [gate, sig], f"layers.{i}.silu")
    act = g.op("Mul", [act, up], f"layers.{i}.act")
    down = t[m + "down_proj.weight"] * np.float32(cfg.residual_scale)
    return g.linear(act, down, f"layers.{i}.down_proj")


def _llama(g: FusedWriter, cfg: Any, t: dict[str, np.ndarray], max_context: int) -> str:
    """The Llama block with the family switches of models.model.ModelConfig."""
    ropes = _rope_caches(g, cfg, max_context)
    embed = t["model.embed_tokens.weight"]
    x, table = g.embedding("input_ids", embed, "embed_tokens")
    if cfg.embed_scale != 1.0:
        scale = g.weight("embed_scale", np.array(cfg.embed_scale, np.float32))
        x = g.op("Mul", [x, scale], "embed_tokens/scaled")
    eps = float(cfg.norm_eps)
    layout = cfg.norm_layout
    residual, pending = x, None  # pending: the last sublayer output not yet added to residual
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        if layout == "post":  # OLMo 2: attention reads the residual stream itself
            if pending is not None:
                residual = g.op("Add", [pending, residual], f"layers.{i}.residual")
            h = residual
        else:
            ln1 = g.weight(
                f"layers.{i}.input_layernorm", _norm_weight(cfg, t[p + "input_layernorm.weight"])
            )
            if pending is None:
                h = g.op(
                    "SimplifiedLayerNormalization",
                    [residual, ln1],
                    f"layers.{i}.ln1",
                    epsilon=eps,
                    axis=-1,
                )
            else:
                h, _, _, residual = g.node(
                    "SkipSimplifiedLayerNormalization",
                    [pending, residual, ln1],
                    f"layers.{i}.ln1",
                    outputs=4,
                    epsilon=eps,
                )
        qkv = _qkv(g, cfg, t, i, h)
        attn = attention(
            g, cfg, i, qkv, ropes[cfg.layer_rope(i)], cfg.layer_window(i), cfg.attn_softcap
        )
        a = p + "self_attn."
        rs = np.float32(cfg.residual_scale)
        o_bias = t.get(a + "o_proj.bias")
        o = g.linear(
            attn,
            t[a + "o_proj.weight"] * rs,
            f"layers.{i}.o_proj",
            None if o_bias is None else o_bias * rs,
        )
        post_attn = _norm_weight(cfg, t[p + "post_attention_layernorm.weight"])
        if layout == "pre":
            ln2 = g.weight(f"layers.{i}.post_attention_layernorm", post_attn)
            h, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [o, residual, ln2],
                f"layers.{i}.ln2",
                outputs=4,
                epsilon=eps,
            )
        else:
            o = _rms(g, o, post_attn, eps, f"layers.{i}.post_attention_layernorm")
            if layout == "sandwich":
                pre_ff = _norm_weight(cfg, t[p + "pre_feedforward_layernorm.weight"])
                ln2 = g.weight(f"layers.{i}.pre_feedforward_layernorm", pre_ff)
                h, _, _, residual = g.node(
                    "SkipSimplifiedLayerNormalization",
                    [o, residual, ln2],
                    f"layers.{i}.ln2",
                    outputs=4,
                    epsilon=eps,
                )
            else:
                residual = g.op("Add", [o, residual], f"layers.{i}.attn_residual")
                h = residual
        pending = _mlp(g, cfg, t, i, h)
        if layout != "pre":
            post_ff = _norm_weight(cfg, t[p + "post_feedforward_layernorm.weight"])
            pending = _rms(g, pending, post_ff, eps, f"layers.{i}.post_feedforward_layernorm")
    pending, residual = _last_positions(g, [pending, residual])
    # the logit scale (Granite) is folded into the final norm: the head is linear, unbiased
    norm = g.weight("norm", _norm_weight(cfg, t["model.norm.weight"], cfg.logits_scale))
    h = g.op(
        "SkipSimplifiedLayerNormalization", [pending, residual, norm], "final_norm", epsilon=eps
    )
    if cfg.tie_word_embeddings:
        return g.lm_head(h, embed, "lm_head", tied_to=table)
    return g.lm_head(h, t["lm_head.weight"], "lm_head")


def _gpt2(g: FusedWriter, cfg: Any, t: dict[str, np.ndarray], max_context: int) -> str:
    wte = t["transformer.wte.weight"]
    tok, table = g.embedding("input_ids", wte, "wte")
    wpe = g.weight("wpe.weight", t["transformer.wpe.weight"][:max_context])
    pos = g.op("Gather", [wpe, "position_ids"], "wpe")
    residual = g.op("Add", [tok, pos], "embed")
    eps = float(cfg.norm_eps)
    pending, pending_bias = None, None
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        ln1 = [
            g.weight(f"h.{i}.ln_1.weight", t[p + "ln_1.weight"]),
            g.weight(f"h.{i}.ln_1.bias", t[p + "ln_1.bias"]),
        ]
        if pending is None:
            h = g.op("LayerNormalization", [residual, *ln1], f"h.{i}.ln_1", epsilon=eps, axis=-1)
        else:
            h, _, _, residual = g.node(
                "SkipLayerNormalization",
                [pending, residual, *ln1, pending_bias],
                f"h.{i}.ln_1",
                outputs=4,
                epsilon=eps,
            )
        # Conv1D weights are [in, out]
        wqkv, bias = _packed_qkv(cfg, t[p + "attn.c_attn.weight"].T, t[p + "attn.c_attn.bias"])
        qkv = g.linear(h, wqkv, f"h.{i}.c_attn", bias)
        attn = attention(g, cfg, i, qkv, rotary=False)
        o = g.linear(attn, t[p + "attn.c_proj.weight"].T, f"h.{i}.attn_c_proj")
        ln2 = [
            g.weight(f"h.{i}.ln_2.weight", t[p + "ln_2.weight"]),
            g.weight(f"h.{i}.ln_2.bias", t[p + "ln_2.bias"]),
            g.weight(f"h.{i}.attn_c_proj.bias", t[p + "attn.c_proj.bias"]),
        ]
        h, _, _, residual = g.node(
            "SkipLayerNormalization", [o, residual, *ln2], f"h.{i}.ln_2", outputs=4, epsilon=eps
        )
        fc = g.linear(h, t[p + "mlp.c_fc.weight"].T, f"h.{i}.c_fc")
        fc_bias = g.weight(f"h.{i}.c_fc.bias", t[p + "mlp.c_fc.bias"])
        act = g.op("FastGelu", [fc, fc_bias], f"h.{i}.gelu")
        pending = g.linear(act, t[p + "mlp.c_proj.weight"].T, f"h.{i}.mlp_c_proj")
        pending_bias = g.weight(f"h.{i}.mlp_c_proj.bias", t[p + "mlp.c_proj.bias"])
    pending, residual = _last_positions(g, [pending, residual])
    ln_f = [
        g.weight("ln_f.weight", t["transformer.ln_f.weight"]),
        g.weight("ln_f.bias", t["transformer.ln_f.bias"]),
    ]
    h = g.op(
        "SkipLayerNormalization", [pending, residual, *ln_f, pending_bias], "ln_f", epsilon=eps
    )
    return g.lm_head(h, wte, "lm_head", tied_to=table)


def build_fused_graph(
    src: Source, *, precision: str = "fp32", max_context: int = 2048
) -> onnx.ModelProto:
    """The engine's graph from checkpoint tensors (I/O: docs/architecture.md, "The fused graph")."""
    _check(src, precision, max_context)
    cfg = src.config
    g = FusedWriter(precision)
    build = _llama if cfg.family == "llama" else _gpt2
    logits = build(g, cfg, src.tensors, max_context)
    if precision == "fp16":
        logits = g.op("Cast", [logits], "logits/float", to=TensorProto.FLOAT)
    cap = getattr(cfg, "final_softcap", 0.0)
    if cap:  # Gemma 2: logits -> cap * tanh(logits / cap), in float32
        inv = g.const("final_softcap/inv", np.array(1.0 / cap, np.float32))
        capped = g.op("Tanh", [g.op("Mul", [logits, inv], "final_softcap/div")], "final_softcap")
        logits = g.op(
            "Mul",
            [capped, g.const("final_softcap/cap", np.array(cap, np.float32))],
            "final_softcap/out",
        )
    g.op("Identity", [logits], "logits")
    inputs, outputs = _inputs_outputs(cfg, g, max_context)
    return g.model(
        f"{cfg.model_type}-fused-{precision}",
        inputs,
        outputs,
        doc=f"fused {precision} graph, max_context={max_context}",
    )
