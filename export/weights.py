"""Checkpoint -> ExportSource: ModelConfig plus float32 numpy tensors in Hugging Face names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.manifest import sha256_file

if TYPE_CHECKING:
    from models.model import CausalLM, ModelConfig
    from models.tokenizer import TokenizerBundle


@dataclass(frozen=True)
class SourceFile:
    """One weight file of the source checkpoint, for the manifest."""

    path: Path
    size: int
    sha256: str


@dataclass
class ExportSource:
    """Everything the graph builders, the verifier and the manifest read from a checkpoint.

    `tensors` are float32 numpy arrays under the HF names of docs/architecture.md (a tied
    lm_head is absent). This is the only place torch tensors are touched on the export side.
    """

    config: ModelConfig
    tensors: dict[str, np.ndarray]
    tokenizer: TokenizerBundle
    generation_config: dict[str, Any]
    source: Path
    source_files: list[SourceFile]

    @property
    def kind(self) -> str:
        """ "gguf" for a .gguf file, "hf" for a Hugging Face folder."""
        return "gguf" if self.source.is_file() else "hf"


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any float dtype) or array as a contiguous float32 numpy array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to("cpu").float().contiguous().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def load_export_source(path: str | Path) -> ExportSource:
    """Read an HF folder or .gguf file through models.checkpoint; ModelError on bad input."""
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    tensors = {name: _to_numpy(t) for name, t in ckpt.tensors.items()}
    files = [
        SourceFile(Path(p), Path(p).stat().st_size, sha256_file(Path(p))) for p in ckpt.source_files
    ]
    return ExportSource(
        config=ckpt.config,
        tensors=tensors,
        tokenizer=ckpt.tokenizer,
        generation_config=dict(ckpt.generation_config or {}),
        source=Path(ckpt.source),
        source_files=files,
    )


def reference_model(src: ExportSource) -> CausalLM:
    """The PyTorch CausalLM holding the source's weights (float32, eval mode), for verification."""
    import torch

    from models.checkpoint import Checkpoint
    from models.model import CausalLM

    tensors = {name: torch.from_numpy(a) for name, a in src.tensors.items()}
    ckpt = Checkpoint(
        config=src.config,
        tensors=tensors,
        tokenizer=src.tokenizer,
        generation_config=src.generation_config,
        source=src.source,
        source_files=[f.path for f in src.source_files],
    )
    return CausalLM.from_checkpoint(ckpt)
