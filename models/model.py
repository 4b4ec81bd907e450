"""Decoder-only transformers in plain PyTorch: Llama family (Llama, Mistral, Qwen2) and GPT-2."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from models.errors import ModelError, listing

LayerCache = tuple[Tensor, Tensor]  # (k, v), each [B, kv_heads, seq, head_dim]
KVCache = list[LayerCache]


# -----------------------------------------------------------------------------
# shared pieces: positions, masks, attention


def positions_from_mask(attention_mask: Tensor, seq_len: int) -> Tensor:
    """Positions of the last `seq_len` columns of a left-padded 1/0 mask, as transformers does."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq_len:]


def build_attention_mask(
    attention_mask: Tensor | None, seq_len: int, past_len: int
) -> Tensor | None:
    """Boolean [B|1, 1, T, past+T] mask (True = attend); None for plain causal or 1-token steps."""
    if attention_mask is None and (past_len == 0 or seq_len == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
    k_pos = torch.arange(past_len + seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos  # [T, S]
    if attention_mask is None:
        return allowed[None, None]
    allowed = allowed & attention_mask[:, None, None, :].bool()
    # a padding query sees no keys; let it see itself so softmax stays finite
    return allowed | (k_pos == q_pos)


def attend(
    q: Tensor, k: Tensor, v: Tensor, past: LayerCache | None, mask: Tensor | None
) -> tuple[Tensor, LayerCache]:
    """Causal attention of q [B,H,T,D] over past + new k, v [B,KV,T,D]; returns (y, present)."""
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    present = (k, v)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # grouped-query attention: each kv head serves n_rep query heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    is_causal = mask is None and q.shape[2] > 1  # no mask with T > 1 only happens without a past
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return y, present


class Weights(Protocol):
    """What a model is built from: a config and its tensors in HF names (a Checkpoint is one)."""

    config: ModelConfig
    tensors: dict[str, Tensor]


# -----------------------------------------------------------------------------
# Llama family


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, head_dim] for rotary embeddings, in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = hd = cfg.head_dim
        d, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.q_proj = nn.Linear(d, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
        # transformers gives Llama's o_proj a bias with attention_bias; Qwen2's never has one
        self.o_proj = nn.Linear(q_dim, d, bias=cfg.attention_bias and cfg.model_type == "llama")

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        past: LayerCache | None = None,
    ) -> tuple[Tensor, LayerCache]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y, present = attend(q, k, v, past, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), present


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        past: LayerCache | None = None,
    ) -> tuple[Tensor, LayerCache]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, past: list
    ) -> tuple[Tensor, KVCache]:
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        presents = []
        for layer, layer_past in zip(self.layers, past, strict=True):
            x, present = layer(x, cos, sin, mask, layer_past)
            presents.append(present)
        return self.norm(x), presents


# -----------------------------------------------------------------------------
# GPT-2 family


class Conv1D(nn.Module):
    """A linear layer with its weight stored [in, out], as GPT-2 checkpoints hold it."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: Tensor, mask: Tensor | None, past: LayerCache | None = None
    ) -> tuple[Tensor, LayerCache]:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y, present = attend(q, k, v, past, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), present


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # gelu_new


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(
        self, x: Tensor, mask: Tensor | None, past: LayerCache | None = None
    ) -> tuple[Tensor, LayerCache]:
        h, present = self.attn(self.ln_1(x), mask, past)
        x = x + h
        return x + self.mlp(self.ln_2(x)), present


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, past: list
    ) -> tuple[Tensor, KVCache]:
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for block, layer_past in zip(self.h, past, strict=True):
            x, present = block(x, mask, layer_past)
            presents.append(present)
        return self.ln_f(x), presents


# -----------------------------------------------------------------------------
# the causal language model


class CausalLM(nn.Module):
    """A decoder-only LM whose state_dict uses Hugging Face names (`model.*` / `transformer.*`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.family == "llama":
            self.model = LlamaBackbone(config)
        else:
            self.transformer = GPT2Backbone(config)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.input_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding | Conv1D):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear | Conv1D) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def backbone(self) -> nn.Module:
        return self.model if self.config.family == "llama" else self.transformer

    @property
    def input_embedding(self) -> nn.Embedding:
        return self.model.embed_tokens if self.config.family == "llama" else self.transformer.wte

    def forward(
        self,
        input_ids: Tensor,
        past_key_values: KVCache | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Logits [B, T, V] and the per-layer cache (k, v), each [B, kv_heads, past + T, head_dim].

        attention_mask [B, past + T] of 1/0 marks real tokens (left padding); positions then
        follow from it unless position_ids is given.
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past_len + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, "
                f"expected {(B, past_len + T)}"
            )
        if self.config.family == "gpt2" and past_len + T > self.config.max_position_embeddings:
            raise ValueError(
                f"{past_len + T} tokens exceed GPT-2's learned positions "
                f"({self.config.max_position_embeddings})"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)
                position_ids = position_ids.expand(B, T)
        mask = build_attention_mask(attention_mask, T, past_len)
        if mask is not None:
            mask = mask.to(input_ids.device)
        past = past_key_values or [None] * self.config.num_layers
        x, presents = self.backbone(input_ids, position_ids, mask, past)
        return self.lm_head(x), presents

    @classmethod
    def from_checkpoint(cls, ckpt: Weights) -> CausalLM:
        """A float32 model in eval mode holding the checkpoint's weights."""
        with torch.device("meta"):
            model = cls(ckpt.config)
        model = model.to_empty(device="cpu")
        if model.config.tie_word_embeddings:  # to_empty unties shared parameters
            model.lm_head.weight = model.input_embedding.weight
        model.load_hf_state_dict(ckpt.tensors)
        return model.eval()

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Parameters under their Hugging Face names; a tied lm_head is left out, as HF saves it."""
        state = {name: t.detach() for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        return state

    def load_hf_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy HF-named tensors into the parameters (cast to their dtype); ModelError if wrong."""
        own = self.hf_state_dict()
        missing = [name for name in own if name not in tensors]
        if missing:
            raise ModelError(f"missing tensors for {self.config.model_type}: {listing(missing)}")
        with torch.no_grad():
            for name, param in own.items():
                src = tensors[name]
                if tuple(src.shape) != tuple(param.shape):
                    raise ModelError(
                        f"tensor {name} has shape {list(src.shape)}, expected {list(param.shape)}"
                    )
                param.copy_(src)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once), optionally without embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(
                m.weight.numel() for m in self.backbone.modules() if isinstance(m, nn.Embedding)
            )
        return n


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes a checkpoint of this config must hold."""
    with torch.device("meta"):
        model = CausalLM(config)
    return {name: tuple(t.shape) for name, t in model.hf_state_dict().items()}


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "hf_tensor_shapes",
]
