"""ModelConfig: the architecture of a supported checkpoint and its family switches, read from and
written to HF config dicts (torch-free: the runtime's default-model build uses it; models.model
builds the network)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.errors import ModelError
from models.rope import check_scaling, inv_frequencies, rope_type

SUPPORTED_MODEL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "smollm3",
    "granite",
    "olmo2",
)
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
# activations of the gated MLP: HF names -> ours
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
NORM_LAYOUTS = ("pre", "sandwich", "post")

# -----------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """One description of every supported decoder: GPT-2, or the Llama block with switches.

    The switches after `pad_token_id` default to plain Llama; each family of
    SUPPORTED_MODEL_TYPES sets the ones it needs (see `_llama_config`).
    """

    family: str  # "llama" | "gpt2"
    model_type: str  # HF model_type (SUPPORTED_MODEL_TYPES)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int  # the usable context (capped where exactness ends)
    norm_eps: float
    rope_theta: float  # 0.0 for GPT-2 (learned positions)
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (o_proj too but for Qwen2); Qwen2, GPT-2: always
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # rotary: HF rope parameters beyond the theta (rope_type, factor, ...; models.rope)
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int = 0  # rotated dimensions of a head (partial rotary); 0: all of head_dim
    local_rope_theta: float = 0.0  # theta of the sliding-window layers (Gemma 3); 0: rope_theta
    no_rope_layers: tuple[int, ...] = ()  # layers without rotary (SmolLM3)
    sliding_window: int = 0  # keys a query sees in a windowed layer, itself included; 0: none
    sliding_layers: tuple[int, ...] = ()  # the windowed layers
    # block
    hidden_act: str = "silu"  # gated MLP activation: silu | gelu_tanh (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's 1
    norm_layout: str = "pre"  # pre (Llama) | sandwich (Gemma 2/3) | post (OLMo 2)
    qk_norm: str = (
        ""  # RMSNorm of q and k: "" | "head" (per head: Qwen3, Gemma 3) | "full" (OLMo 2)
    )
    fused_projections: bool = False  # qkv_proj and gate_up_proj tensors (Phi-3)
    attn_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0: off
    final_softcap: float = 0.0  # the same on the logits
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite's multiplier)
    residual_scale: float = 1.0  # sublayer outputs times this before the residual add (Granite)
    logits_scale: float = 1.0  # logits times this (Granite: 1 / logits_scaling)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(_unsupported(self.model_type))
        family = "gpt2" if self.model_type == "gpt2" else "llama"
        if self.family != family:
            raise ModelError(f"model_type {self.model_type!r} belongs to family {family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.model_type == "mistral" and self.attention_bias:
            raise ModelError("mistral has no attention biases")
        if self.model_type in ("qwen2", "gpt2") and not self.attention_bias:
            raise ModelError(f"{self.model_type} always has attention biases")
        if self.model_type == "gpt2" and (
            not self.tie_word_embeddings or self.num_kv_heads != self.num_heads
        ):
            raise ModelError("gpt2 has tied embeddings and no grouped-query attention")
        if self.hidden_act not in ACTIVATIONS.values():
            raise ModelError(f"unknown hidden_act {self.hidden_act!r}")
        if self.norm_layout not in NORM_LAYOUTS:
            raise ModelError(f"unknown norm_layout {self.norm_layout!r}")
        if self.qk_norm not in ("", "head", "full"):
            raise ModelError(f"unknown qk_norm {self.qk_norm!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ModelError(f"rotary_dim {self.rotary_dim} does not fit head_dim {self.head_dim}")
        check_scaling(self.rope_scaling)
        bad = [i for i in (*self.no_rope_layers, *self.sliding_layers) if i >= self.num_layers]
        if bad:
            raise ModelError(f"layer index {bad[0]} is past num_layers ({self.num_layers})")

    @property
    def rotary_dims(self) -> int:
        """The rotated dimensions of each head."""
        return self.rotary_dim or self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    def layer_window(self, i: int) -> int:
        """Layer i's sliding window (keys seen, itself included), 0 for full attention."""
        return self.sliding_window if i in self.sliding_layers else 0

    def layer_rope(self, i: int) -> float:
        """Layer i's rope theta; 0.0 for a layer without rotary."""
        if self.family != "llama" or i in self.no_rope_layers:
            return 0.0
        if self.local_rope_theta and i in self.sliding_layers:
            return self.local_rope_theta
        return self.rope_theta

    def rope_frequencies(self, theta: float) -> tuple[Any, float]:
        """(inv_freq float32 numpy [rotary_dims/2], attention factor) for a layer's theta; the
        global layers' rope scaling applies at rope_theta only (Gemma 3's local layers: none)."""
        scaling = self.rope_scaling if theta == self.rope_theta else None
        return inv_frequencies(self.rotary_dims, theta, scaling, self.max_position_embeddings)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Read a transformers config.json dict; ModelError for unsupported architectures."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(_unsupported(model_type))
        try:
            return _gpt2_config(config) if model_type == "gpt2" else _llama_config(config)
        except KeyError as exc:
            raise ModelError(f"{model_type} config lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"invalid {model_type} config: {exc}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the same architecture."""
        common: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.family == "gpt2":
            return common | {
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False,
            }
        act = {v: k for k, v in ACTIVATIONS.items() if k != "swish"}[self.hidden_act]
        rope = (
            {"rope_type": "default"} | (self.rope_scaling or {}) | {"rope_theta": self.rope_theta}
        )
        window = self.sliding_window or None
        layer_types = [
            "sliding_attention" if i in self.sliding_layers else "full_attention"
            for i in range(self.num_layers)
        ]
        hf = common | {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": act,
            "rope_theta": self.rope_theta,  # transformers < 5
            "rope_parameters": rope,
        }
        if self.model_type != "qwen2":
            hf |= {"attention_bias": self.attention_bias, "mlp_bias": False}
        if self.model_type in ("qwen2", "qwen3", "smollm3"):
            hf |= {"sliding_window": window, "use_sliding_window": bool(window)}
            hf |= {"layer_types": layer_types}
        if self.model_type in ("mistral", "phi3"):
            hf |= {"sliding_window": window}
        if self.model_type == "smollm3":
            hf["no_rope_layers"] = [
                int(i not in self.no_rope_layers) for i in range(self.num_layers)
            ]
        if self.model_type == "phi3":
            hf["partial_rotary_factor"] = self.rotary_dims / self.head_dim
            rope["partial_rotary_factor"] = self.rotary_dims / self.head_dim
            if "original_max_position_embeddings" in rope:
                hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        if self.model_type in GEMMAS:
            hf["hidden_activation"] = act
        if self.model_type in ("gemma2", "gemma3_text"):
            hf |= {
                "query_pre_attn_scalar": _integral(self.softmax_scale**-2),
                "attn_logit_softcapping": self.attn_softcap or None,
                "final_logit_softcapping": self.final_softcap or None,
                "sliding_window": window,
                "layer_types": layer_types,
            }
        if self.model_type == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta or self.rope_theta}
            hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
            hf["rope_local_base_freq"] = local["rope_theta"]
        if self.model_type == "granite":
            hf |= {
                "embedding_multiplier": self.embed_scale,
                "attention_multiplier": self.softmax_scale,
                "residual_multiplier": self.residual_scale,
                "logits_scaling": 1.0 / self.logits_scale,
            }
        return hf


def _integral(x: float) -> float | int:
    """x as an int when it is one (up to float rounding): transformers types some keys int."""
    return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def _unsupported(model_type: object) -> str:
    what = "no model_type" if model_type is None else f"unsupported model_type {model_type!r}"
    return f"{what} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"


def _int(c: dict[str, Any], key: str) -> int:
    """A required positive integer of an HF config."""
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(
            f"{c.get('model_type')} config needs {key} as a positive integer, got {value!r}"
        )
    return value


def _rope(c: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
    """(global rope parameters, theta, local theta) from rope_parameters / rope_scaling."""
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    local_theta = float(c.get("rope_local_base_freq") or 0.0)
    if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
        local = rope.get("sliding_attention") or {}
        if rope_type(local) != "default":
            raise ModelError(f"unsupported rope_type {rope_type(local)!r} on sliding layers")
        local_theta = float(local.get("rope_theta") or local_theta)
        rope = dict(rope.get("full_attention") or {})
        if c.get("rope_scaling"):
            rope |= c["rope_scaling"]
    theta = float(rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0)
    if local_theta == theta and rope_type(rope) != "default":
        raise ModelError("rope scaling on global layers that share the local layers' theta")
    return rope, theta, local_theta


def _layer_types(c: dict[str, Any], model_type: str, n: int) -> tuple[int, ...]:
    """The sliding-window layers, as transformers' configs lay them out."""
    types = c.get("layer_types")
    if types:
        if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise ModelError(f"{model_type} layer_types must name {n} attention layer types")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if model_type in ("mistral", "phi3"):
        return tuple(range(n))
    if model_type == "gemma2":
        return tuple(i for i in range(n) if (i + 1) % 2)
    if model_type == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern") or 6)
        return tuple(i for i in range(n) if (i + 1) % pattern)
    first = int(c.get("max_window_layers") or 0)  # Qwen2, Qwen3
    return tuple(range(first, n))


def _llama_config(c: dict[str, Any]) -> ModelConfig:
    """Every family built on the Llama block: its switches from the config's own keys."""
    model_type = c["model_type"]
    gemma = model_type in GEMMAS
    act = c.get("hidden_activation") if model_type in ("gemma2", "gemma3_text") else None
    act = act or c.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if gemma and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh form
        act = "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ModelError(
            f"unsupported hidden_act {act!r} for {model_type} (supported: {', '.join(ACTIVATIONS)})"
        )
    if c.get("mlp_bias"):
        raise ModelError(f"mlp_bias is not supported for {model_type}")
    if c.get("use_bidirectional_attention"):
        raise ModelError(f"use_bidirectional_attention is not supported for {model_type}")
    hidden, heads = _int(c, "hidden_size"), _int(c, "num_attention_heads")
    layers = _int(c, "num_hidden_layers")
    head_dim = int(c.get("head_dim") or hidden // heads)
    max_positions = _int(c, "max_position_embeddings")
    scaling, theta, local_theta = _rope(c)
    kind = rope_type(scaling)
    if kind == "longrope" and c.get("original_max_position_embeddings"):
        scaling.setdefault(
            "original_max_position_embeddings", c["original_max_position_embeddings"]
        )
    check_scaling(scaling)
    if kind == "longrope":
        original = int(
            scaling.get("original_max_position_embeddings") or c["original_max_position_embeddings"]
        )
        # the long factors only serve sequences past the original length, and transformers
        # switches to them for the whole sequence there: stop at the original length
        scaling = scaling | {
            "original_max_position_embeddings": original,
            "factor": float(scaling.get("factor") or max_positions / original),
        }
        max_positions = min(max_positions, original)
    scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}
    if kind == "default":
        scaling = None
    partial = float(
        c.get("partial_rotary_factor") or (scaling or {}).get("partial_rotary_factor") or 1.0
    )
    if scaling:
        scaling.pop("partial_rotary_factor", None)
    rotary_dim = int(head_dim * partial) if partial != 1.0 else 0
    window = c.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "smollm3") and not c.get("use_sliding_window"):
        window = None
    sliding = _layer_types(c, model_type, layers) if window else ()
    no_rope: tuple[int, ...] = ()
    if model_type == "smollm3":
        flags = c.get("no_rope_layers")
        if flags is None:
            interval = int(c.get("no_rope_layer_interval") or 4)
            flags = [int((i + 1) % interval != 0) for i in range(layers)]
        no_rope = tuple(i for i, use in enumerate(flags) if not use)
    switches: dict[str, Any] = {}
    if gemma:
        switches |= dict(norm_offset=1.0, embed_scale=hidden**0.5)
    if model_type in ("gemma2", "gemma3_text"):
        switches |= dict(
            norm_layout="sandwich",
            attn_scale=float(c.get("query_pre_attn_scalar") or 256) ** -0.5,
            attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(c.get("final_logit_softcapping") or 0.0),
        )
    if model_type in ("qwen3", "gemma3_text"):
        switches["qk_norm"] = "head"
    if model_type == "olmo2":
        switches |= dict(norm_layout="post", qk_norm="full")
    if model_type == "granite":
        switches |= dict(
            embed_scale=float(c.get("embedding_multiplier", 1.0)),
            attn_scale=float(c.get("attention_multiplier", 1.0)),
            residual_scale=float(c.get("residual_multiplier", 1.0)),
            logits_scale=1.0 / float(c.get("logits_scaling", 1.0)),
        )
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=_int(c, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=_int(c, "intermediate_size"),
        max_position_embeddings=max_positions,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        rope_scaling=scaling,
        rotary_dim=rotary_dim,
        local_rope_theta=local_theta if model_type == "gemma3_text" else 0.0,
        no_rope_layers=no_rope,
        sliding_window=int(window or 0),
        sliding_layers=sliding,
        hidden_act=ACTIVATIONS[act],
        fused_projections=model_type == "phi3",
        **switches,
    )


def _gpt2_config(c: dict[str, Any]) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    if act != "gelu_new":
        raise ModelError(f"unsupported activation_function {act!r} for gpt2 (supported: gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if c.get(flag):
            raise ModelError(f"{flag}=true is not supported for gpt2")
    if not c.get("scale_attn_weights", True):
        raise ModelError("scale_attn_weights=false is not supported for gpt2")
    hidden, heads = _int(c, "n_embd"), _int(c, "n_head")
    return ModelConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=_int(c, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(c, "n_layer"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(c.get("n_inner") or 4 * hidden),
        max_position_embeddings=_int(c, "n_positions"),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        rope_theta=0.0,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
    )
