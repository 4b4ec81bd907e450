"""PEFT LoRA adapters: read an adapter folder and merge it into its base checkpoint's weights.

The format is PEFT's (adapter_config.json + adapter_model.safetensors): per target module
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (embeddings:
`.lora_embedding_A` [r, vocab], `.lora_embedding_B` [dim, r]); the merged weight is
W + (B @ A) * scaling, transposed for `fan_in_fan_out` layers and embeddings, with
scaling = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` and
`alpha_pattern` per module). `modules_to_save` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.errors import ModelError, first_line, listing
from models.lazy_tensors import LazyTensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json settings whose effect this merge does not reproduce: refused, named
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


@dataclass
class LoraPair:
    """One target module's low-rank update."""

    a: torch.Tensor  # [r, in] (embedding: [r, vocab])
    b: torch.Tensor  # [out, r] (embedding: [dim, r])
    embedding: bool = False


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # module name -> update
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors

    @property
    def base_name(self) -> str | None:
        base = self.config.get("base_model_name_or_path")
        return base if isinstance(base, str) and base else None

    def scaling(self, module: str, rank: int) -> float:
        """lora_alpha / r (or / sqrt(r)), with the alpha_pattern entry matching `module`."""
        alpha = float(self.config.get("lora_alpha", 8))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                alpha = float(value)
                break
        root = math.sqrt(rank) if self.config.get("use_rslora") else rank
        return alpha / root

    def delta(self, module: str) -> torch.Tensor:
        """The float32 update of `module`'s weight, in the weight's stored layout."""
        pair = self.pairs[module]
        a, b = pair.a.float(), pair.b.float()
        update = (b @ a) * self.scaling(module, a.shape[0])
        if pair.embedding or self.config.get("fan_in_fan_out"):
            update = update.T
        return update.contiguous()


def is_adapter(path: Path) -> bool:
    """Whether `path` is a PEFT adapter folder."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_adapter(path: Path) -> LoraAdapter:
    """The adapter folder's config and tensors; one-line ModelError for what we cannot merge."""
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file}: unreadable ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LoRA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ModelError(f"{config_file}: {what} cannot be merged at export")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{config_file}: trained biases (bias={config['bias']!r}) are not merged")
    if not weights.is_file():
        legacy = (path / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is not supported: re-save with safetensors)" if legacy else ""
        raise ModelError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    adapter = LoraAdapter(path, config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                _sort(adapter, halves, key, f.get_tensor(key))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: corrupt safetensors file ({first_line(exc)})") from None
    for module, parts in halves.items():
        embedding = bool(parts.pop("embedding", False))
        if set(parts) != {"A", "B"}:
            raise ModelError(f"{weights}: {module} has lora_{next(iter(parts))} alone")
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(
                f"{weights}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                "do not share a rank"
            )
        adapter.pairs[module] = LoraPair(a, b, embedding=embedding)
    if not adapter.pairs and not adapter.replaced:
        raise ModelError(f"{weights}: holds no LoRA weights")
    return adapter


def _sort(
    adapter: LoraAdapter, halves: dict[str, dict[str, Any]], key: str, value: torch.Tensor
) -> None:
    """File one adapter tensor: a lora_A/lora_B half, or a modules_to_save replacement."""
    name = key.removeprefix(PREFIX)
    if ".base_layer." in name or ".original_module." in name:
        return  # copies of the base's own weights
    if "lora_magnitude_vector" in name:
        raise ModelError(f"{adapter.path / ADAPTER_WEIGHTS}: DoRA weights cannot be merged")
    linear = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
    embedding = re.fullmatch(r"(.+)\.lora_embedding_([AB])(?:\.[^.]+)?", name)
    if linear:
        halves.setdefault(linear.group(1), {})[linear.group(2)] = value
    elif embedding:
        parts = halves.setdefault(embedding.group(1), {})
        parts[embedding.group(2)] = value
        parts["embedding"] = True
    elif ".lora_" in name:
        raise ModelError(f"{adapter.path / ADAPTER_WEIGHTS}: unknown LoRA tensor {key}")
    else:
        name = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name)
        adapter.replaced[name] = value


def resolve_base(adapter_path: Path, base: str | Path | None, adapter: LoraAdapter) -> Path:
    """The base checkpoint: `base` when given, else the adapter config's base when local."""
    if base is not None:
        base_path = Path(base).expanduser()
        if not base_path.exists():
            raise ModelError(f"{base_path}: no such base checkpoint folder or file")
        return base_path
    named = adapter.base_name
    if named is None:
        raise ModelError(
            f"{adapter_path}: a LoRA adapter needs its base model and adapter_config.json names "
            "none: give it with --base BASE"
        )
    base_path = Path(named).expanduser()
    if not base_path.is_absolute():
        base_path = adapter_path / base_path if (adapter_path / base_path).exists() else base_path
    if not base_path.exists():
        raise ModelError(
            f"{adapter_path}: the base model {named!r} named in adapter_config.json is not a "
            "local folder (models are not downloaded): give a local copy with --base BASE"
        )
    return base_path


def merge(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], adapter: LoraAdapter, base: Path
) -> tuple[ModelConfig, LazyTensors]:
    """The base's config and tensors with the adapter merged (each merged when read, float32).

    A module the adapter targets must exist in the base with a matching shape; a
    modules_to_save head on a tied base unties it.
    """
    label = adapter.path / ADAPTER_WEIGHTS
    shapes = {name: tuple(_shape(tensors, name)) for name in tensors}
    if "lm_head.weight" in adapter.replaced and config.tie_word_embeddings:
        config = dataclasses.replace(config, tie_word_embeddings=False)
    lacking = [m for m in adapter.pairs if f"{m}.weight" not in shapes]
    lacking += [n for n in adapter.replaced if n not in shapes and n != "lm_head.weight"]
    if lacking:
        raise ModelError(
            f"{label}: the adapter targets {listing(lacking)}, which the base ({base}) lacks"
        )
    for module, pair in adapter.pairs.items():
        out, inp = (pair.b.shape[0], pair.a.shape[1])
        want = (inp, out) if pair.embedding or adapter.config.get("fan_in_fan_out") else (out, inp)
        if shapes[f"{module}.weight"] != want:
            raise ModelError(
                f"{label}: {module}: the update is {list(want)} but the base's weight is "
                f"{list(shapes[f'{module}.weight'])} (an adapter for another base model?)"
            )
    for name, value in adapter.replaced.items():
        want_shape = shapes.get(name) or shapes.get(_embedding_name(tensors))
        if want_shape is not None and tuple(value.shape) != want_shape:
            raise ModelError(
                f"{label}: {name} is {list(value.shape)} but the base's is {list(want_shape)}"
            )
    updates = {f"{m}.weight": m for m in adapter.pairs}

    def load(name: str) -> torch.Tensor:
        if name in adapter.replaced:
            return adapter.replaced[name].float()
        weight = tensors[name]
        if name not in updates:
            return weight
        return weight.float() + adapter.delta(updates[name])

    return config, LazyTensors([*tensors, *adapter.replaced], load)


def _shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape = getattr(tensors, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(tensors[name].shape)


def _embedding_name(tensors: Mapping[str, torch.Tensor]) -> str:
    return next((n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight"))), "")
