"""Checkpoint -> ExportSource: ModelConfig plus float32 numpy tensors in Hugging Face names."""

from __future__ import annotations

from collections.abc import Mapping
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
    lm_head is absent). A loaded source reads each from the checkpoint's files when asked for
    (models.lazy_tensors.LazyTensors): the graph writers take one at a time, so an export holds
    about one tensor of the checkpoint at once. This is the only place torch tensors are touched
    on the export side.
    """

    config: ModelConfig
    tensors: Mapping[str, np.ndarray]
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


def load_export_source(path: str | Path, base: str | Path | None = None) -> ExportSource:
    """Read an HF folder, .gguf file or LoRA adapter (over `base`) through models.checkpoint;
    ModelError on bad input."""
    from models.checkpoint import load_checkpoint
    from models.lazy_tensors import LazyTensors

    ckpt = load_checkpoint(path, base)
    stored = ckpt.tensors
    tensors = LazyTensors(stored, lambda name: _to_numpy(stored[name]))
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


def _torch_tensors(src: ExportSource) -> Mapping[str, Any]:
    """The source's tensors as float32 torch tensors, each read when asked for."""
    import torch

    from models.lazy_tensors import LazyTensors

    return LazyTensors(src.tensors, lambda name: torch.from_numpy(src.tensors[name]))


def reference_model(src: ExportSource) -> CausalLM:
    """The PyTorch CausalLM holding the source's weights (float32, eval mode), for verification."""
    from models.checkpoint import Checkpoint
    from models.model import CausalLM

    ckpt = Checkpoint(
        config=src.config,
        tensors=_torch_tensors(src),
        tokenizer=src.tokenizer,
        generation_config=src.generation_config,
        source=src.source,
        source_files=[f.path for f in src.source_files],
    )
    return CausalLM.from_checkpoint(ckpt)


def reference_logits(src: ExportSource, input_ids: np.ndarray) -> np.ndarray:
    """The PyTorch model's float32 logits [B, T, vocab] for `input_ids` in one causal pass,
    holding one module's weights at a time: the model is built without memory (meta device),
    each module that owns parameters gets them from the source just before it runs and drops
    them after, so the check of a large export costs no second copy of its weights."""
    import torch
    from torch import nn

    from models.model import CausalLM

    cfg = src.config
    with torch.device("meta"):
        model = CausalLM(cfg).eval()
    if next(model.buffers(), None) is not None:  # buffers would stay on meta: load it whole
        return _whole_model_logits(src, input_ids)
    tensors = _torch_tensors(src)
    embedding = next(n for n, m in model.named_modules() if m is model.input_embedding)
    owners = [
        (n, m)
        for n, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]

    def source_name(full: str) -> str:
        if full not in tensors and full == "lm_head.weight" and cfg.tie_word_embeddings:
            return f"{embedding}.weight"
        return full

    def load(prefix: str, module: nn.Module) -> None:
        for local, param in list(module.named_parameters(recurse=False)):
            value = tensors[source_name(f"{prefix}.{local}" if prefix else local)]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{prefix}.{local}: shape {list(value.shape)}")
            setattr(module, local, nn.Parameter(value, requires_grad=False))

    def drop(module: nn.Module) -> None:
        for local, param in list(module.named_parameters(recurse=False)):
            setattr(module, local, nn.Parameter(param.to("meta"), requires_grad=False))

    handles = []
    for prefix, module in owners:
        handles.append(module.register_forward_pre_hook(lambda m, a, p=prefix: load(p, m)))
        handles.append(module.register_forward_hook(lambda m, a, o: drop(m)))
    try:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(input_ids)))[0].numpy()
    except (RuntimeError, NotImplementedError):
        # a module that reads a child's parameters without calling it (they are still on
        # meta): the same logits from the whole model, at the whole model's memory
        return _whole_model_logits(src, input_ids)
    finally:
        for handle in handles:
            handle.remove()


def _whole_model_logits(src: ExportSource, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return reference_model(src)(torch.from_numpy(np.ascontiguousarray(input_ids)))[0].numpy()
