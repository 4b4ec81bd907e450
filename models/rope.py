"""Rotary inverse frequencies of each supported rope_type, as transformers computes them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.errors import ModelError

# rope types whose frequencies do not depend on the sequence length within the usable context
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope_type of an HF rope_parameters / rope_scaling dict ("default" when absent)."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return "longrope" if kind == "su" else kind  # Phi-3's old name


def check_scaling(scaling: dict[str, Any] | None) -> None:
    """A one-line ModelError when a rope scaling dict lacks what its type needs."""
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ModelError(f"unsupported rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    needs = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings"),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
        "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    }.get(kind, ())
    missing = [k for k in needs if (scaling or {}).get(k) is None]
    if missing:
        raise ModelError(f"rope_type {kind!r} needs {', '.join(missing)} in rope_parameters")


def inv_frequencies(
    dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [dim/2], attention_factor) for `dim` rotary dimensions.

    Mirrors transformers' modeling_rope_utils in float32. `dynamic` equals `default` inside
    max_position_embeddings (transformers rescales only past it); `longrope` gives the short
    factors, which transformers uses while the sequence stays within the original length.
    """
    kind = rope_type(scaling)
    s = scaling or {}
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(theta) ** exponents
    inv = (np.float32(1.0) / base).astype(np.float32)
    factor = float(s.get("factor") or 1.0)
    if kind in ("default", "dynamic"):
        return inv, 1.0
    if kind == "linear":
        return (inv / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv, s), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, s, max_positions)
    # longrope
    original = int(s["original_max_position_embeddings"])
    if s.get("factor") is None:
        factor = max_positions / original
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = np.asarray(s["short_factor"], np.float32)
    if short.shape != inv.shape:
        raise ModelError(f"longrope short_factor has {short.size} values, expected {inv.size}")
    return (np.float32(1.0) / (short * base)).astype(np.float32), float(attention)


def _llama3(inv: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = np.float32(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(
        np.float32
    )
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(
    dim: int, theta: float, s: dict[str, Any], max_positions: int
) -> tuple[np.ndarray, float]:
    original = int(s["original_max_position_embeddings"])
    factor = s.get("factor")
    if factor is None:
        factor = max_positions / original
    factor = float(factor)
    attention = s.get("attention_factor")
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    if attention is None:
        if mscale and mscale_all:
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all)
        else:
            attention = _mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv.astype(np.float32), float(attention)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
