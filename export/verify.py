"""Parity of an exported graph against the PyTorch model (or, without torch, the reference
graph of the same weights): a prefill, then cached single steps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Threshold:
    max_rel_error: float  # max |graph - torch| / max |torch| over the logits of any step
    min_top1_agreement: float  # share of compared positions whose argmax token agrees


# One table for every precision. fp32 is issue 3's bar; the others are set from measurement with
# headroom, on the verification below (4 natural-text prompts, prefill 16 + 16 cached steps)
# through `python -m export CKPT --precision P --force --json` (ORT 1.31 CPU provider).
# Measured max_rel_error / top-1 agreement on SmolLM2-135M-Instruct:
#   fp32 (reference and fused):  2.8e-6 / 1.000
#   fp16 (fused):                2.5e-3 / 1.000
#   int8 (fused, MatMulNBits):   5.7e-2 / 0.985 (the tied Q8_0 embedding/head kept exact)
#   int4 (fused, MatMulNBits):   4.1e-2 / 0.985 (weights exactly the GGUF's Q4_1/Q8_0 blocks)
# What is left in int8 and int4 is the int8 activations of MatMulNBits' fast path
# (accuracy_level 4): with float activations int4 gives 9.5e-6 / 1.000 but decodes slower than
# fp32 (docs/performance.md, "Faithful quantization"). The quantized bars are there to catch a
# broken graph (wrong packing or scales give near-zero agreement and errors far above 1); what a
# user sees, greedy answers against fp32's, is export.gate's job. Random-token prompts, used
# before, gave flat distributions that said more about near-ties than about the graph.
THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold(max_rel_error=1e-4, min_top1_agreement=1.0),
    "fp16": Threshold(max_rel_error=1e-2, min_top1_agreement=0.98),
    "int8": Threshold(max_rel_error=1e-1, min_top1_agreement=0.9),
    "int4": Threshold(max_rel_error=1.0, min_top1_agreement=0.7),
}


@dataclass(frozen=True)
class VerifyOptions:
    prompts: int = 4
    prompt_length: int = 16
    steps: int = 16
    seed: int = 0


class _ReferenceRunner:
    """A plain ORT loop over the reference graph: present = Concat(past, new), fed back as past."""

    def __init__(self, session: Any, cfg: Any) -> None:
        self.session, self.cfg = session, cfg
        self.outputs = [o.name for o in session.get_outputs()]

    def start(self, batch: int) -> None:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        self.past = {
            f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(self.cfg.num_layers)
            for kind in ("key", "value")
        }
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [B, T]; returns logits [B, T, vocab]."""
        batch, t = ids.shape
        positions = np.arange(self.length, self.length + t, dtype=np.int64)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, self.length + t), np.int64),
            "position_ids": np.broadcast_to(positions, (batch, t)).copy(),
            **self.past,
        }
        results = self.session.run(self.outputs, feeds)
        for name, value in zip(self.outputs[1:], results[1:], strict=True):
            self.past[name.replace("present.", "past_key_values.")] = value
        self.length += t
        return results[0]


class _FusedSteps:
    """The fused graph through export.runner (as the engine drives it), all rows in step."""

    def __init__(self, session: Any, cfg: Any) -> None:
        self.session = session

    def start(self, batch: int) -> None:
        from export.runner import FusedRunner

        self.runner = FusedRunner(self.session, batch)
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [B, T] (rows of equal length); returns the last logits [B, 1, vocab]."""
        batch, t = ids.shape
        if self.length + t > self.runner.max_context:
            raise ValueError(
                f"verification needs {self.length + t} positions but max_context is "
                f"{self.runner.max_context}"
            )
        logits = self.runner.run(0, ids, np.full(batch, self.length))
        self.length += t
        return logits[:, None]


def _figures(step: int, got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Error figures of logits [..., vocab]; relative error is scaled by the largest |logit|."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = max(float(np.abs(want).max()), 1e-12)
    return {
        "step": step,
        "max_abs_error": float(diff.max()),
        "max_rel_error": float(diff.max() / scale),
        "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
        "_agree": int(np.sum(got.argmax(-1) == want.argmax(-1))),
        "_count": int(got.shape[0]),
    }


# Natural dialogue, the kind of text the bot serves: quantized graphs are judged on the
# distributions they will meet, not on the flat ones that random token ids give.
PASSAGES = (
    "Hi! Could you tell me what the weather is usually like in Lisbon in spring? "
    "Spring in Lisbon is mild and sunny, with cool evenings and the occasional shower.",
    "Write a Python function that returns the sum of a list. def total(items): return sum(items) "
    "This adds every element and returns zero for an empty list.",
    "What is the capital of France? The capital of France is Paris, which is also its largest "
    "city and sits on the river Seine.",
    "Can you recommend a good book for a long train ride? A long novel works well, for example a "
    "classic adventure story that keeps you turning the pages.",
)


def _prompt_tokens(src: Any, rows: int, length: int, seed: int) -> np.ndarray:
    """`rows` windows of `length` ids: natural passages through the tokenizer, else random ids."""
    rng = np.random.default_rng(seed)
    vocab = min(src.config.vocab_size, src.tokenizer.vocab_size) if src.tokenizer else None
    out = np.empty((rows, length), dtype=np.int64)
    for row in range(rows):
        ids = src.tokenizer.encode(" ".join(PASSAGES[row:] + PASSAGES[:row])) if vocab else []
        ids = [i for i in ids if i < (vocab or 0)]
        if len(ids) < 2:  # no usable tokenizer: random ids over the model's vocabulary
            ids = rng.integers(0, src.config.vocab_size, length).tolist()
        out[row] = np.resize(np.asarray(ids, dtype=np.int64), length)
    return out


def verify(
    graph: str | Path,
    src: Any,
    *,
    flavour: str,
    precision: str = "fp32",
    settings: VerifyOptions = VerifyOptions(),
    model: Any = None,
    against: str = "torch",
) -> dict[str, Any]:
    """Run the graph (ORT, CPU) and the source's CausalLM on the same natural-text prompts.

    The prompts (PASSAGES through the tokenizer) run as one batch. The graph gets a prefill of
    `prompt_length` tokens, then `steps` single-token steps through its cache; the PyTorch model
    computes the logits of all those positions in one causal pass, so the graph's cache
    handling is checked against a cache-free computation. Returns the parity figures
    (export.manifest.Parity fields); `passed` applies THRESHOLDS.

    `against="reference"` computes the expected logits with the reference graph built from the
    same weights (standard ONNX ops, fp32, through ORT) in place of the PyTorch model: the check
    of the build without torch (the reference graph is checked against torch by the tests).
    """
    from export.runner import cpu_session
    from export.weights import reference_logits

    started = time.perf_counter()
    if precision not in THRESHOLDS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(THRESHOLDS)})")
    if against not in ("torch", "reference"):
        raise ValueError(f"unknown verification {against!r} (choose from torch, reference)")
    cfg = src.config
    length, steps = settings.prompt_length, settings.steps
    tokens = _prompt_tokens(src, settings.prompts, length + steps, settings.seed)
    # one causal pass gives the logits of every position the graph sees; computed before the
    # graph is loaded (from PyTorch, one module's weights at a time, or the reference graph of
    # the same weights for the build without torch), so the two never share the memory
    if against == "reference":
        want = reference_graph_logits(src, tokens)
    elif model is not None:
        want = torch_logits(model, tokens)
    else:
        want = reference_logits(src, tokens)
    session = cpu_session(Path(graph))
    runner = (_FusedSteps if flavour == "fused" else _ReferenceRunner)(session, cfg)
    runner.start(settings.prompts)
    per_step = []
    for step in range(steps + 1):
        start, stop = (0, length) if step == 0 else (length + step - 1, length + step)
        got = runner.step(tokens[:, start:stop])
        expected = want[:, stop - 1 : stop] if flavour == "fused" else want[:, start:stop]
        per_step.append(_figures(step, got, expected))
    threshold = THRESHOLDS[precision]
    agree, count = sum(f.pop("_agree") for f in per_step), sum(f.pop("_count") for f in per_step)
    summary = {
        "max_abs_error": max(f["max_abs_error"] for f in per_step),
        "max_rel_error": max(f["max_rel_error"] for f in per_step),
        "top1_agreement": agree / count,
    }
    passed = (
        summary["max_rel_error"] < threshold.max_rel_error
        and summary["top1_agreement"] >= threshold.min_top1_agreement
    )
    return {
        "passed": bool(passed),
        "thresholds": asdict(threshold),
        "prompts": settings.prompts,
        "prompt_length": settings.prompt_length,
        "steps": settings.steps,
        **summary,
        "per_step": per_step,
        "seconds": round(time.perf_counter() - started, 3),
    }


def torch_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    """The PyTorch model's logits [B, T, vocab] of every position, in one causal pass."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens))[0].numpy()


_REFERENCE_LOGITS: dict[tuple, np.ndarray] = {}


def reference_graph_logits(src: Any, tokens: np.ndarray) -> np.ndarray:
    """The reference graph's logits [B, T, vocab] of every position, in one pass with an empty
    cache: the graph is built from src's weights in a temporary folder (torch-free). Kept per
    source files and tokens: ensure-default verifies up to three precisions of one source."""
    import tempfile

    from export.graph_reference import build_reference_graph
    from export.onnx_graph import GRAPH_FILE, save_model
    from export.runner import cpu_session

    key = (
        tuple((str(f.path), f.sha256) for f in src.source_files),
        tokens.shape,
        tokens.tobytes(),
    )
    if src.source_files and key in _REFERENCE_LOGITS:
        return _REFERENCE_LOGITS[key]
    with tempfile.TemporaryDirectory(prefix="verify-reference-") as tmp:
        path = save_model(build_reference_graph(src), Path(tmp) / GRAPH_FILE)
        runner = _ReferenceRunner(cpu_session(path), src.config)
        runner.start(tokens.shape[0])
        logits = runner.step(tokens)
    _REFERENCE_LOGITS.clear()
    if src.source_files:
        _REFERENCE_LOGITS[key] = logits
    return logits


def describe_failure(figures: dict[str, Any]) -> str:
    """One line saying which threshold the figures miss."""
    t = figures["thresholds"]
    return (
        f"parity check failed: max relative logit error {figures['max_rel_error']:.3g} "
        f"(limit {t['max_rel_error']:.3g}), top-1 agreement {figures['top1_agreement']:.3f} "
        f"(needs {t['min_top1_agreement']:.3f})"
    )
