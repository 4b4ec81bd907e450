"""The reference graph: standard ONNX ops, Hugging Face/optimum I/O names, fp32, concat KV."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.onnx_graph import PORTABLE_OPSET, GraphWriter

NEG_INF = float(np.finfo(np.float32).min)  # added to masked scores, as transformers does


def _linear(
    b: GraphWriter, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None
) -> str:
    """x @ weight (+ bias) for a weight already laid out [in, out]."""
    y = b.op("MatMul", [x, b.const(f"{name}.weight", weight)], f"{name}/matmul")
    if bias is not None:
        y = b.op("Add", [y, b.const(f"{name}.bias", bias)], f"{name}/bias")
    return y


# -----------------------------------------------------------------------------
# shared pieces


def _attention_mask(b: GraphWriter, window: int = 0) -> str:
    """Additive mask [batch, 1, seq, past+seq]: 0 where a query may attend, NEG_INF elsewhere.

    Causal over absolute columns (query t sits at column past+t), and padding columns (mask 0)
    are hidden; a padding query still sees itself so its softmax stays finite, as models/ does.
    `window` > 0 also hides columns `window` or more before the query (a sliding window).
    """
    m = f"mask.{window}" if window else "mask"
    total = b.op("Shape", ["attention_mask"], f"{m}/shape", start=1, end=2)
    seq = b.op("Shape", ["input_ids"], f"{m}/seq", start=1, end=2)
    zero, one = b.ints(f"{m}/zero", [0]), b.ints(f"{m}/one", [1])
    total_s = b.op("Squeeze", [total, zero], f"{m}/total_s")
    past_s = b.op("Squeeze", [b.op("Sub", [total, seq], f"{m}/past"), zero], f"{m}/past_s")
    one_s = b.const(f"{m}/one_s", np.array(1, np.int64))
    cols = b.op(
        "Range", [b.const(f"{m}/zero_s", np.array(0, np.int64)), total_s, one_s], f"{m}/cols"
    )
    rows = b.op("Range", [past_s, total_s, one_s], f"{m}/rows")
    rows = b.op("Unsqueeze", [rows, one], f"{m}/rows2d")  # [seq, 1]
    causal = b.op("LessOrEqual", [cols, rows], f"{m}/causal")  # [seq, total]
    diagonal = b.op("Equal", [cols, rows], f"{m}/diagonal")
    real = b.op("Cast", ["attention_mask"], f"{m}/real", to=TensorProto.BOOL)
    real = b.op("Unsqueeze", [real, b.ints(f"{m}/axes12", [1, 2])], f"{m}/real4d")  # [B,1,1,S]
    if window:
        near = b.op(
            "Greater",
            [
                cols,
                b.op(
                    "Sub", [rows, b.const(f"{m}/window", np.array(window, np.int64))], f"{m}/reach"
                ),
            ],
            f"{m}/near",
        )
        causal = b.op("And", [causal, near], f"{m}/windowed")
    allowed = b.op("And", [causal, real], f"{m}/allowed")
    allowed = b.op("Or", [allowed, diagonal], f"{m}/allowed_self")
    return b.op(
        "Where",
        [
            allowed,
            b.const(f"{m}/open", np.array(0.0, np.float32)),
            b.const(f"{m}/shut", np.array(NEG_INF, np.float32)),
        ],
        f"{m}/additive",
    )


def _heads(b: GraphWriter, x: str, heads: int, head_dim: int, name: str) -> str:
    """[B, T, heads*head_dim] -> [B, heads, T, head_dim]."""
    shape = b.ints(f"{name}/shape", [0, 0, heads, head_dim])
    return b.op(
        "Transpose", [b.op("Reshape", [x, shape], f"{name}/split")], name, perm=[0, 2, 1, 3]
    )


def _repeat_kv(b: GraphWriter, cfg: Any, x: str, rep: int, name: str) -> str:
    """[B, KV, S, D] -> [B, KV*rep, S, D]: each kv head serves `rep` query heads, in order."""
    x = b.op("Unsqueeze", [x, b.ints(f"{name}/axis", [2])], f"{name}/5d")
    x = b.op("Expand", [x, b.ints(f"{name}/rep", [1, 1, rep, 1, 1])], f"{name}/expanded")
    return b.op(
        "Reshape",
        [x, b.ints(f"{name}/merged", [0, cfg.num_heads, -1, cfg.head_dim])],
        f"{name}/heads",
    )


def _attend(b: GraphWriter, cfg: Any, i: int, q: str, k: str, v: str, mask: str) -> str:
    """Concatenate the cache, attend over it (GQA by repeating kv heads); returns [B, T, H*D]."""
    p = f"layers.{i}.attn"
    k = b.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
    v = b.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
    rep = cfg.num_heads // cfg.num_kv_heads
    if rep > 1:
        k, v = _repeat_kv(b, cfg, k, rep, f"{p}/k"), _repeat_kv(b, cfg, v, rep, f"{p}/v")
    kt = b.op("Transpose", [k], f"{p}/kt", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, kt], f"{p}/scores")
    softmax_scale = getattr(cfg, "softmax_scale", 1.0 / math.sqrt(cfg.head_dim))
    scale = b.const(f"{p}/scale", np.array(softmax_scale, np.float32))
    scores = b.op("Mul", [scores, scale], f"{p}/scaled")
    cap = getattr(cfg, "attn_softcap", 0.0)
    if cap:  # Gemma 2: cap * tanh(scores / cap), before the mask
        inv_cap = b.const(f"{p}/inv_cap", np.array(1.0 / cap, np.float32))
        scores = b.op("Tanh", [b.op("Mul", [scores, inv_cap], f"{p}/div_cap")], f"{p}/tanh")
        scores = b.op(
            "Mul", [scores, b.const(f"{p}/cap", np.array(cap, np.float32))], f"{p}/capped"
        )
    scores = b.op("Add", [scores, mask], f"{p}/masked")
    probs = b.op("Softmax", [scores], f"{p}/probs", axis=-1)
    y = b.op("MatMul", [probs, v], f"{p}/context")
    y = b.op("Transpose", [y], f"{p}/context_t", perm=[0, 2, 1, 3])
    return b.op("Reshape", [y, b.ints(f"{p}/flat", [0, 0, -1])], f"{p}/out")


# -----------------------------------------------------------------------------
# Llama family


def _rms_norm(b: GraphWriter, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    sq = b.op("Mul", [x, x], f"{name}/sq")
    mean = b.op("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)
    var = b.op("Add", [mean, b.const(f"{name}/eps", np.array(eps, np.float32))], f"{name}/var")
    inv = b.op("Reciprocal", [b.op("Sqrt", [var], f"{name}/std")], f"{name}/inv")
    y = b.op("Mul", [x, inv], f"{name}/normed")
    return b.op("Mul", [y, b.const(f"{name}.weight", weight)], name)


def _rotary(b: GraphWriter, cfg: Any, theta: float | None = None) -> tuple[str, str]:
    """cos, sin [B, 1, T, rotary dims] from position_ids for the layers at `theta` (default:
    rope_theta), with the rope scaling's frequencies and attention factor (models.rope)."""
    theta = cfg.rope_theta if theta is None else theta
    p = "rope" if theta == cfg.rope_theta else f"rope.{theta:g}"
    if hasattr(cfg, "rope_frequencies"):
        inv_freq, factor = cfg.rope_frequencies(theta)
    else:
        exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
        inv_freq, factor = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32), 1.0
    pos = b.op("Cast", ["position_ids"], f"{p}/pos", to=TensorProto.FLOAT)
    pos = b.op("Unsqueeze", [pos, b.ints(f"{p}/axis", [-1])], f"{p}/pos3d")
    freqs = b.op("Mul", [pos, b.const(f"{p}/inv_freq", inv_freq)], f"{p}/freqs")
    emb = b.op("Concat", [freqs, freqs], f"{p}/emb", axis=-1)
    axis1 = b.ints(f"{p}/axis1", [1])
    cos = b.op("Unsqueeze", [b.op("Cos", [emb], f"{p}/cos3d"), axis1], f"{p}/cos")
    sin = b.op("Unsqueeze", [b.op("Sin", [emb], f"{p}/sin3d"), axis1], f"{p}/sin")
    if factor != 1.0:
        f = b.const(f"{p}/factor", np.array(factor, np.float32))
        cos = b.op("Mul", [cos, f], f"{p}/cos_scaled")
        sin = b.op("Mul", [sin, f], f"{p}/sin_scaled")
    return cos, sin


def _apply_rotary(
    b: GraphWriter, x: str, cos: str, sin: str, name: str, dims: int = 0, head_dim: int = 0
) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1), over the first `dims`
    of head_dim (partial rotary passes the rest through; 0: all of them)."""
    rest = None
    if dims and dims < head_dim:
        sizes = b.ints(f"{name}/parts", [dims, head_dim - dims])
        x, rest = b.node("Split", [x, sizes], f"{name}/partial", outputs=2, axis=-1)
    x1, x2 = b.node("Split", [x], f"{name}/halves", outputs=2, axis=-1)
    rotated = b.op("Concat", [b.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotated", axis=-1)
    a = b.op("Mul", [x, cos], f"{name}/cos")
    c = b.op("Mul", [rotated, sin], f"{name}/sin")
    if rest is None:
        return b.op("Add", [a, c], name)
    return b.op("Concat", [b.op("Add", [a, c], f"{name}/rot"), rest], name, axis=-1)


def _norm_weight(cfg: Any, w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """An RMSNorm's effective weight: (offset + w), Gemma's offset being 1, times `scale`."""
    offset = np.float32(getattr(cfg, "norm_offset", 0.0))
    return ((np.asarray(w, np.float32) + offset) * np.float32(scale)).astype(np.float32)


def _llama(b: GraphWriter, cfg: Any, t: dict[str, np.ndarray]) -> str:
    """The Llama block with the family switches of models.model.ModelConfig."""
    embed = b.const("model.embed_tokens.weight", t["model.embed_tokens.weight"])
    x = b.op("Gather", [embed, "input_ids"], "embed")
    if cfg.embed_scale != 1.0:
        scale = b.const("embed/scale", np.array(cfg.embed_scale, np.float32))
        x = b.op("Mul", [x, scale], "embed/scaled")
    masks = {0: _attention_mask(b)}
    ropes: dict[float, tuple[str, str] | None] = {0.0: None}
    eps, hd, layout = float(cfg.norm_eps), cfg.head_dim, cfg.norm_layout
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
    rs = np.float32(cfg.residual_scale)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        window, theta = cfg.layer_window(i), cfg.layer_rope(i)
        if window not in masks:
            masks[window] = _attention_mask(b, window)
        if theta not in ropes:
            ropes[theta] = _rotary(b, cfg, theta)
        h = x
        if layout != "post":
            w = _norm_weight(cfg, t[p + "input_layernorm.weight"])
            h = _rms_norm(b, x, w, eps, p + "input_layernorm")
        a = p + "self_attn."
        if cfg.fused_projections:
            qkv = _linear(b, h, t[a + "qkv_proj.weight"].T, a + "qkv_proj")
            sizes = b.ints(a + "qkv/sizes", [q_dim, kv_dim, kv_dim])
            q, k, v = b.node("Split", [qkv, sizes], a + "qkv", outputs=3, axis=-1)
        else:
            q = _linear(b, h, t[a + "q_proj.weight"].T, a + "q_proj", t.get(a + "q_proj.bias"))
            k = _linear(b, h, t[a + "k_proj.weight"].T, a + "k_proj", t.get(a + "k_proj.bias"))
            v = _linear(b, h, t[a + "v_proj.weight"].T, a + "v_proj", t.get(a + "v_proj.bias"))
        if cfg.qk_norm == "full":
            q = _rms_norm(b, q, _norm_weight(cfg, t[a + "q_norm.weight"]), eps, a + "q_norm")
            k = _rms_norm(b, k, _norm_weight(cfg, t[a + "k_norm.weight"]), eps, a + "k_norm")
        q = _heads(b, q, cfg.num_heads, hd, a + "q")
        k = _heads(b, k, cfg.num_kv_heads, hd, a + "k")
        if cfg.qk_norm == "head":
            q = _rms_norm(b, q, _norm_weight(cfg, t[a + "q_norm.weight"]), eps, a + "q_norm")
            k = _rms_norm(b, k, _norm_weight(cfg, t[a + "k_norm.weight"]), eps, a + "k_norm")
        if ropes[theta] is not None:
            cos, sin = ropes[theta]
            dims = cfg.rotary_dims
            q = _apply_rotary(b, q, cos, sin, a + "q_rot", dims, hd)
            k = _apply_rotary(b, k, cos, sin, a + "k_rot", dims, hd)
        v = _heads(b, v, cfg.num_kv_heads, hd, a + "v")
        y = _attend(b, cfg, i, q, k, v, masks[window])
        o_bias = t.get(a + "o_proj.bias")
        y = _linear(
            b,
            y,
            t[a + "o_proj.weight"].T * rs,
            a + "o_proj",
            None if o_bias is None else o_bias * rs,
        )
        post_attn = _norm_weight(cfg, t[p + "post_attention_layernorm.weight"])
        if layout == "pre":
            x = b.op("Add", [x, y], f"{p}attn_residual")
            h = _rms_norm(b, x, post_attn, eps, p + "post_attention_layernorm")
        else:
            y = _rms_norm(b, y, post_attn, eps, p + "post_attention_layernorm")
            x = b.op("Add", [x, y], f"{p}attn_residual")
            h = x
            if layout == "sandwich":
                w = _norm_weight(cfg, t[p + "pre_feedforward_layernorm.weight"])
                h = _rms_norm(b, x, w, eps, p + "pre_feedforward_layernorm")
        m = p + "mlp."
        if cfg.fused_projections:
            gu = _linear(b, h, t[m + "gate_up_proj.weight"].T, m + "gate_up_proj")
            sizes = b.ints(m + "gate_up/sizes", [cfg.intermediate_size] * 2)
            gate, up = b.node("Split", [gu, sizes], m + "gate_up", outputs=2, axis=-1)
        else:
            gate = _linear(b, h, t[m + "gate_proj.weight"].T, m + "gate_proj")
            up = _linear(b, h, t[m + "up_proj.weight"].T, m + "up_proj")
        if cfg.hidden_act == "gelu_tanh":
            act = _gelu_new(b, gate, m + "gelu")
        else:
            act = b.op("Mul", [gate, b.op("Sigmoid", [gate], m + "sigmoid")], m + "silu")
        h = _linear(
            b, b.op("Mul", [act, up], m + "act"), t[m + "down_proj.weight"].T * rs, m + "down_proj"
        )
        if layout != "pre":
            w = _norm_weight(cfg, t[p + "post_feedforward_layernorm.weight"])
            h = _rms_norm(b, h, w, eps, p + "post_feedforward_layernorm")
        x = b.op("Add", [x, h], f"{p}mlp_residual")
    x = _rms_norm(b, x, _norm_weight(cfg, t["model.norm.weight"]), eps, "model.norm")
    if cfg.tie_word_embeddings:
        head = b.op("Transpose", [embed], "lm_head.weight_t", perm=[1, 0])
        logits = b.op("MatMul", [x, head], "lm_head")
    else:
        logits = _linear(b, x, t["lm_head.weight"].T, "lm_head")
    if cfg.logits_scale != 1.0:
        scale = b.const("logits/scale", np.array(cfg.logits_scale, np.float32))
        logits = b.op("Mul", [logits, scale], "logits/scaled")
    if cfg.final_softcap:
        inv = b.const("logits/inv_cap", np.array(1.0 / cfg.final_softcap, np.float32))
        capped = b.op("Tanh", [b.op("Mul", [logits, inv], "logits/div")], "logits/tanh")
        cap = b.const("logits/cap", np.array(cfg.final_softcap, np.float32))
        logits = b.op("Mul", [capped, cap], "logits/capped")
    return logits


# -----------------------------------------------------------------------------
# GPT-2 family


def _layer_norm(b: GraphWriter, x: str, t: dict[str, np.ndarray], prefix: str, eps: float) -> str:
    w, bias = (
        b.const(prefix + ".weight", t[prefix + ".weight"]),
        b.const(prefix + ".bias", t[prefix + ".bias"]),
    )
    return b.op("LayerNormalization", [x, w, bias], prefix, axis=-1, epsilon=eps)


def _gelu_new(b: GraphWriter, x: str, name: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's activation."""
    cube = b.op("Mul", [b.op("Mul", [x, x], f"{name}/sq"), x], f"{name}/cube")
    inner = b.op("Mul", [cube, b.const(f"{name}/c", np.array(0.044715, np.float32))], f"{name}/c3")
    inner = b.op("Add", [x, inner], f"{name}/inner")
    scale = np.array(math.sqrt(2.0 / math.pi), np.float32)
    th = b.op(
        "Tanh",
        [b.op("Mul", [inner, b.const(f"{name}/k", scale)], f"{name}/scaled")],
        f"{name}/tanh",
    )
    one = b.op("Add", [th, b.const(f"{name}/one", np.array(1.0, np.float32))], f"{name}/one_plus")
    half = b.op("Mul", [x, b.const(f"{name}/half", np.array(0.5, np.float32))], f"{name}/half_x")
    return b.op("Mul", [half, one], name)


def _gpt2(b: GraphWriter, cfg: Any, t: dict[str, np.ndarray]) -> str:
    wte = b.const("transformer.wte.weight", t["transformer.wte.weight"])
    wpe = b.const("transformer.wpe.weight", t["transformer.wpe.weight"])
    tok = b.op("Gather", [wte, "input_ids"], "wte")
    x = b.op("Add", [tok, b.op("Gather", [wpe, "position_ids"], "wpe")], "embed")
    mask = _attention_mask(b)
    eps, d = float(cfg.norm_eps), cfg.hidden_size
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        h = _layer_norm(b, x, t, p + "ln_1", eps)
        qkv = _linear(
            b, h, t[p + "attn.c_attn.weight"], p + "attn.c_attn", t[p + "attn.c_attn.bias"]
        )
        split = b.ints(p + "attn/split", [d, d, d])
        q, k, v = b.node("Split", [qkv, split], p + "attn/qkv", outputs=3, axis=-1)
        q, k, v = (
            _heads(b, n, cfg.num_heads, cfg.head_dim, f"{p}attn.{c}")
            for n, c in zip((q, k, v), "qkv", strict=True)
        )
        y = _attend(b, cfg, i, q, k, v, mask)
        y = _linear(b, y, t[p + "attn.c_proj.weight"], p + "attn.c_proj", t[p + "attn.c_proj.bias"])
        x = b.op("Add", [x, y], f"{p}attn_residual")
        h = _layer_norm(b, x, t, p + "ln_2", eps)
        h = _linear(b, h, t[p + "mlp.c_fc.weight"], p + "mlp.c_fc", t[p + "mlp.c_fc.bias"])
        h = _gelu_new(b, h, p + "mlp.gelu")
        h = _linear(b, h, t[p + "mlp.c_proj.weight"], p + "mlp.c_proj", t[p + "mlp.c_proj.bias"])
        x = b.op("Add", [x, h], f"{p}mlp_residual")
    x = _layer_norm(b, x, t, "transformer.ln_f", eps)
    head = b.op("Transpose", [wte], "lm_head.weight_t", perm=[1, 0])
    return b.op("MatMul", [x, head], "lm_head")


# -----------------------------------------------------------------------------
# the graph


def io_spec(cfg: Any) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Inputs and outputs with the names and dynamic axes optimum's ORTModelForCausalLM uses."""
    kv = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    present = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", i64, ["batch_size", "total_sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", f32, ["batch_size", "sequence_length", cfg.vocab_size]
        )
    ]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present))
    return inputs, outputs


def build_reference_graph(src: Any) -> onnx.ModelProto:
    """The fp32 standard-ops graph for an ExportSource (config + float32 HF-named tensors)."""
    cfg = src.config
    if cfg.family not in ("llama", "gpt2"):
        raise ValueError(f"unsupported family {cfg.family!r} (supported: llama, gpt2)")
    b = GraphWriter()
    logits = (_llama if cfg.family == "llama" else _gpt2)(b, cfg, src.tensors)
    b.op("Identity", [logits], "logits")
    inputs, outputs = io_spec(cfg)
    return b.model(
        f"{cfg.model_type}-reference",
        inputs,
        outputs,
        opset=PORTABLE_OPSET,
        doc="reference fp32 graph (standard ONNX ops, concatenating KV cache)",
    )
