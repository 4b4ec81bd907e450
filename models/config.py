"""ModelConfig: the architecture of a supported checkpoint, read from and written to HF config
dicts (torch-free: the runtime's default-model build uses it; models.model builds the network)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.errors import ModelError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass
class ModelConfig:
    family: str  # "llama" | "gpt2"
    model_type: str  # HF model_type: llama, mistral, qwen2, gpt2
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float  # 0.0 for GPT-2 (learned positions)
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Llama: o_proj too, as transformers); Qwen2, GPT-2: always
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

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
        hf = common | {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,  # transformers < 5
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }
        if self.model_type == "llama":
            hf |= {"attention_bias": self.attention_bias, "mlp_bias": False}
        else:
            hf |= {"sliding_window": None, "use_sliding_window": False}
        return hf


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


def _llama_config(c: dict[str, Any]) -> ModelConfig:
    model_type = c["model_type"]
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ModelError(
            f"unsupported hidden_act {c['hidden_act']!r} for {model_type} (supported: silu)"
        )
    if c.get("mlp_bias"):
        raise ModelError(f"mlp_bias is not supported for {model_type}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"unsupported rope_type {rope_type!r} (supported: default)")
    hidden, heads = _int(c, "hidden_size"), _int(c, "num_attention_heads")
    max_positions = _int(c, "max_position_embeddings")
    # A sliding window only changes attention beyond its length: cap the usable context there.
    window = c.get("sliding_window")
    if window and (model_type == "mistral" or c.get("use_sliding_window")):
        max_positions = min(max_positions, int(window))
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=_int(c, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(c, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        intermediate_size=_int(c, "intermediate_size"),
        max_position_embeddings=max_positions,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
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
