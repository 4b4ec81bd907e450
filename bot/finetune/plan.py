"""What a job tunes and how: the base checkpoint (kept under DATA_DIR/checkpoints), LoRA or full
fine-tuning, and whether the disk and memory have room for it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.finetune.errors import FinetuneError

if TYPE_CHECKING:
    from export.manifest import Architecture
    from export.registry import VersionInfo

LORA_ABOVE_PARAMS = 50_000_000  # full fine-tuning below (every weight fits with its optimizer)
LORA_RANK = 16
BYTES = 4  # training runs in float32


@dataclass(frozen=True)
class Plan:
    base_ref: str  # NAME@N of the version tuned
    name: str  # the registry name the new version is published under
    source: Path  # the checkpoint that version was exported from, as recorded
    kind: str  # "hf" or "gguf"
    precision: str
    gate_passed: bool  # the base passed the quality gate: the new version must too
    params: int
    method: str  # "lora" or "full"
    max_context: int  # the base version's graph context (the new one gets the same)
    max_positions: int

    def describe(self) -> str:
        how = f"LoRA rank {LORA_RANK}" if self.method == "lora" else "full fine-tuning"
        return f"{self.base_ref} ({self.params / 1e6:.1f}M parameters): {how}"


def count_params(a: Architecture) -> int:
    """The parameter count from the manifest's architecture (biases and norms aside)."""
    kv = a.num_kv_heads * a.head_dim
    attn = a.hidden_size * (a.num_heads * a.head_dim) * 2 + a.hidden_size * kv * 2
    mlp = a.hidden_size * a.intermediate_size * (3 if a.family == "llama" else 2)
    embed = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    return a.num_layers * (attn + mlp) + embed


def plan_for(info: VersionInfo, method: str | None = None) -> Plan:
    """The plan to tune a registry version; FinetuneError when its checkpoint is gone."""
    manifest = info.manifest()
    source = Path(manifest.source.path)
    if not source.exists():
        raise FinetuneError(
            f"{info.ref} was exported from {source}, which is gone; put the checkpoint back "
            "or export the version again from a checkpoint under DATA_DIR/checkpoints"
        )
    params = count_params(manifest.architecture)
    chosen = method or ("lora" if params > LORA_ABOVE_PARAMS else "full")
    gate = manifest.gate
    return Plan(info.ref, info.name, source, manifest.source.kind, manifest.precision,
                bool(gate and gate.passed), params, chosen, manifest.max_context,
                manifest.architecture.max_position_embeddings)  # fmt: skip


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def needs(plan: Plan) -> tuple[int, int]:
    """(disk bytes, memory bytes) a job needs: the tuned checkpoint, its graph and the training
    state on disk; weights, gradients and AdamW's two moments in memory (LoRA: the weights)."""
    weights = plan.params * BYTES
    full = plan.method == "full"
    return weights * (6 if full else 4), weights * (4 if full else 2)


def check_room(plan: Plan, data_dir: Path) -> None:
    """FinetuneError when the disk or the memory is too small for the job."""
    disk, memory = needs(plan)
    data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    if free < disk:
        raise FinetuneError(
            f"not enough disk space in {data_dir}: {free / 1e9:.1f} GB free, "
            f"the job needs about {disk / 1e9:.1f} GB"
        )
    have = available_memory()
    if have is not None and have < memory:
        raise FinetuneError(
            f"not enough memory: {have / 1e9:.1f} GB available, the job needs about "
            f"{memory / 1e9:.1f} GB"
        )


def keep_base(plan: Plan, checkpoints: Path) -> Path:
    """The base checkpoint, from a copy under `checkpoints` when it is a GGUF file or a folder
    outside it (it may move; a version must stay tunable); already there: as it is."""
    checkpoints = checkpoints.expanduser().resolve()
    source = plan.source.resolve()
    if source.is_relative_to(checkpoints):
        return source
    folder = checkpoints / f"{plan.base_ref.replace('@', '-v')}-base"
    kept = folder / source.name if source.is_file() else folder
    if kept.exists():
        return kept
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, tmp)
    else:
        tmp.mkdir(parents=True)
        shutil.copy2(source, tmp / source.name)
    os.replace(tmp, folder)  # atomic: a half-copied base is never used
    return kept
