"""Decoder-only transformers in plain PyTorch: GPT-2 and the Llama block with family switches."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import (  # noqa: F401  (re-exported: models.model.ModelConfig as before)
    ACTIVATIONS,
    ARCHITECTURES,
    GEMMAS,
    NORM_LAYOUTS,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
)
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
    attention_mask: Tensor | None, seq_len: int, past_len: int, window: int = 0
) -> Tensor | None:
    """Boolean [B|1, 1, T, past+T] mask (True = attend); None for plain causal or 1-token steps.

    `window` > 0 also hides keys `window` or more columns before the query (a sliding window
    over cache columns, as transformers lays it out).
    """
    total = past_len + seq_len
    windowed = 0 < window < total
    if attention_mask is None and not windowed and (past_len == 0 or seq_len == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos  # [T, S]
    if windowed:
        allowed = allowed & (k_pos > q_pos - window)
    if attention_mask is None:
        return allowed[None, None]
    allowed = allowed & attention_mask[:, None, None, :].bool()
    # a padding query sees no keys; let it see itself so softmax stays finite
    return allowed | (k_pos == q_pos)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: LayerCache | None,
    mask: Tensor | None,
    scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[Tensor, LayerCache]:
    """Causal attention of q [B,H,T,D] over past + new k, v [B,KV,T,D]; returns (y, present).

    `scale` multiplies the scores (default 1/sqrt(D)); `softcap` > 0 caps them as
    cap * tanh(scores / cap) before the mask, as Gemma 2 does.
    """
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    present = (k, v)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # grouped-query attention: each kv head serves n_rep query heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    is_causal = mask is None and q.shape[2] > 1  # no mask with T > 1 only happens without a past
    if not softcap:
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale
        )
        return y, present
    scores = torch.matmul(q, k.transpose(2, 3)) * (scale or q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), present


class Weights(Protocol):
    """What a model is built from: a config and its tensors in HF names (a Checkpoint is one)."""

    config: ModelConfig
    tensors: dict[str, Tensor]


# -----------------------------------------------------------------------------
# Llama family (and every family built on its block)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight); Gemma's offset is 1 (its weights start at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, inv_freq: Tensor | None = None,
    attention_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """cos, sin [B, 1, T, rotary dims] for rotary embeddings, in float32 (plain RoPE over
    head_dim at `theta` unless the inverse frequencies of a scaled rope are given)."""
    if inv_freq is None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
        inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos[:, None], sin[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dimensions of each head (partial rotary keeps the rest)."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        rot, rest = x[..., :dim], x[..., dim:]
        return torch.cat([(rot * cos + rotate_half(rot) * sin).to(x.dtype), rest], dim=-1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


Rotary = tuple[Tensor, Tensor] | None  # a layer's (cos, sin), None without rotary


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = hd = cfg.head_dim
        d, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * hd, cfg.num_kv_heads * hd
        if cfg.fused_projections:
            self.qkv_proj = nn.Linear(d, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        else:
            self.q_proj = nn.Linear(d, q_dim, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
        # transformers gives o_proj a bias with attention_bias; Qwen2's never has one
        self.o_proj = nn.Linear(q_dim, d, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        if cfg.qk_norm:
            full = cfg.qk_norm == "full"
            eps, offset = cfg.norm_eps, cfg.norm_offset
            self.q_norm = RMSNorm(q_dim if full else hd, eps, offset)
            self.k_norm = RMSNorm(kv_dim if full else hd, eps, offset)

    def forward(
        self,
        x: Tensor,
        rotary: Rotary,
        mask: Tensor | None,
        past: LayerCache | None = None,
    ) -> tuple[Tensor, LayerCache]:
        B, T, _ = x.shape
        if self.cfg.fused_projections:
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        scale, softcap = self.cfg.softmax_scale, self.cfg.attn_softcap
        y, present = attend(q, k, v, past, mask, scale=scale, softcap=softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), present


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fused = cfg.fused_projections
        d, inner = cfg.hidden_size, cfg.intermediate_size
        if self.fused:
            self.gate_up_proj = nn.Linear(d, 2 * inner, bias=False)
        else:
            self.gate_proj = nn.Linear(d, inner, bias=False)
            self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class LlamaBlock(nn.Module):
    """pre: x + attn(norm(x)), then x + mlp(norm(x)); sandwich (Gemma 2/3) also norms each
    sublayer's output; post (OLMo 2) norms only the outputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layout, self.residual_scale = cfg.norm_layout, cfg.residual_scale
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        if self.layout != "post":
            self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = norm()
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.layout != "pre":
            self.post_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        x: Tensor,
        rotary: Rotary,
        mask: Tensor | None,
        past: LayerCache | None = None,
    ) -> tuple[Tensor, LayerCache]:
        if self.layout == "pre":
            h, present = self.self_attn(self.input_layernorm(x), rotary, mask, past)
            x = x + h * self.residual_scale  # Granite's multiplier (1.0 is exact elsewhere)
            h = self.mlp(self.post_attention_layernorm(x))
            return x + h * self.residual_scale, present
        h = self.input_layernorm(x) if self.layout == "sandwich" else x
        h, present = self.self_attn(h, rotary, mask, past)
        x = x + self.post_attention_layernorm(h)
        h = self.pre_feedforward_layernorm(x) if self.layout == "sandwich" else x
        return x + self.post_feedforward_layernorm(self.mlp(h)), present


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, masks: dict[int, Tensor | None], past: list
    ) -> tuple[Tensor, KVCache]:
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        ropes: dict[float, Rotary] = {0.0: None}
        presents = []
        for i, (layer, layer_past) in enumerate(zip(self.layers, past, strict=True)):
            theta = cfg.layer_rope(i)
            if theta not in ropes:
                inv_freq, factor = cfg.rope_frequencies(theta)
                inv = torch.from_numpy(inv_freq)
                ropes[theta] = rotary_cos_sin(position_ids, 0, theta, inv, factor)
            x, present = layer(x, ropes[theta], masks[cfg.layer_window(i)], layer_past)
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
        x, presents = self.hidden(input_ids, position_ids, attention_mask, past_key_values)
        return self.head(x), presents

    def hidden(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """The final hidden states [B, T, hidden] (before `head`) and the cache."""
        cfg = self.config
        T = input_ids.shape[1]
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        windows = {cfg.layer_window(i) for i in range(cfg.num_layers)} | {0}
        masks = {w: build_attention_mask(attention_mask, T, past_len, w) for w in windows}
        masks = {w: m if m is None else m.to(input_ids.device) for w, m in masks.items()}
        past = past_key_values or [None] * cfg.num_layers
        if cfg.family == "llama":
            return self.model(input_ids, position_ids, masks, past)
        return self.transformer(input_ids, position_ids, masks[0], past)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits of final hidden states: the output layer, its scale and soft-cap."""
        cfg = self.config
        logits = self.lm_head(hidden)
        if cfg.logits_scale != 1.0:
            logits = logits * cfg.logits_scale
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

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
