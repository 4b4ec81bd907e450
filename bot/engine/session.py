"""The engine's ONNX Runtime session: provider choice, CUDA libraries, session options."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnxruntime as ort

from export.runner import CPU, FusedRunner

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"


# ONNX Runtime 1.31 registers its CUDA GroupQueryAttention for fp16 and bf16 only: in a graph of
# any other float type every attention node is placed on the CPU inside a "cuda" session, with
# the KV cache copied both ways on every step. Such versions run on the CPU instead.
CUDA_PRECISIONS = ("fp16",)
CUDA_KV_TYPES = ("tensor(float16)", "tensor(bfloat16)")


@dataclass(frozen=True)
class SessionInfo:
    """Which provider runs the graph, reported by the CLI and the bench."""

    provider: str  # "cuda" or "cpu": runs every node, the attention included
    threads: int  # intra-op threads on the CPU provider (0 on CUDA)
    fallback_reason: str | None = None  # why CUDA was requested (or possible) but the CPU runs
    cuda_graphs: bool = False  # decode steps replay captured CUDA graphs


def cpu_threads() -> int:
    """Intra-op threads that fit the machine: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip's nvidia-* packages install (onnxruntime-gpu
    does not find them by itself unless torch was imported first, and the bot never imports it).

    Once per process; what ORT prints about libraries it cannot find (any CPU-only machine) goes
    to the debug log, not to stdout.
    """
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is None:
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # it reports with print()
            preload()
    except Exception as exc:  # a broken CUDA install must not stop a CPU run
        out.write(f"{type(exc).__name__}: {exc}")
    if said := out.getvalue().strip():
        log.debug("engine: preloading CUDA libraries: %s", said.replace("\n", " | "))


def _options(threads: int, spin: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # idle workers spinning steal the cores the asyncio loop and the sampler need
        # (docs/performance.md: faster with spinning off on a shared CPU)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # when spinning: only inside a run, so the asyncio loop gets the cores between steps
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def _attention_on_cpu(session: ort.InferenceSession) -> bool:
    """Whether a CUDA session would place GroupQueryAttention on the CPU (its KV type)."""
    kv = {i.name: i.type for i in session.get_inputs()}.get("past_key_values.0.key")
    return kv is not None and kv not in CUDA_KV_TYPES


def _cuda_session(graph: Path, cuda_graphs: bool) -> tuple[ort.InferenceSession | None, str, bool]:
    """(session, reason, graphs): a CUDA session, with CUDA graphs when asked for and possible,
    or None and why not."""
    preload_cuda_libraries()
    reason = ""
    # ORT prints its own errors while probing CUDA; we report the outcome ourselves
    ort.set_default_logger_severity(4)
    try:
        for graphs in (True, False) if cuda_graphs else (False,):
            # no TF32: an fp32 graph gives the CPU's greedy tokens (fp16 graphs never use it)
            options = {"device_id": "0", "use_tf32": "0"}
            if graphs:
                options["enable_cuda_graph"] = "1"
            try:
                session = ort.InferenceSession(
                    str(graph), _options(0), providers=[(CUDA, options), CPU]
                )
            except Exception as exc:  # ORT raises RuntimeError/Fail subclasses here
                reason = f"CUDA session failed: {str(exc).splitlines()[0][:200]}"
                if graphs:
                    log.warning("engine: no CUDA graphs (%s); trying without", reason)
                continue
            if session.get_providers()[0] != CUDA:
                return None, "the CUDA provider could not initialise (no usable GPU)", False
            if _attention_on_cpu(session):
                return None, "its attention would run on the CPU (KV cache not fp16)", False
            return session, "", graphs
        return None, reason, False
    finally:
        ort.set_default_logger_severity(2)


def create_session(
    graph: Path,
    device: str = "auto",
    threads: int | None = None,
    spin: bool = False,
    precision: str | None = None,
    cuda_graphs: bool = True,
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session on CUDA when asked for (or `auto`) and usable, else on the CPU, with a warning
    when CUDA was asked for explicitly and could not start.

    `precision` (the manifest's): only CUDA_PRECISIONS run on CUDA; others fall back to the CPU
    (a version whose attention the CUDA provider cannot run is faster there). `cuda_graphs`:
    capture decode steps (export.runner.FusedRunner) when the session allows it.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    reason = None
    if device in ("auto", "cuda"):
        if precision is not None and precision not in CUDA_PRECISIONS:
            reason = (
                f"a {precision} version runs its attention on the CPU under CUDA (ONNX Runtime's "
                "CUDA GroupQueryAttention is fp16/bf16 only); export with --precision fp16"
            )
        elif CUDA not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider"
        else:
            session, reason, graphs = _cuda_session(graph, cuda_graphs)
            if session is not None:
                log.info("engine: CUDA provider for %s (CUDA graphs: %s)", graph, graphs)
                return session, SessionInfo("cuda", 0, cuda_graphs=graphs)
        if device == "cuda":
            log.warning("engine: CUDA requested but not used (%s); running on the CPU", reason)
        else:
            log.info("engine: no usable CUDA (%s); running on the CPU", reason)
    threads = threads or cpu_threads()
    session = ort.InferenceSession(str(graph), _options(threads, spin), providers=[CPU])
    log.info("engine: CPU provider with %d intra-op threads for %s", threads, graph)
    return session, SessionInfo("cpu", threads, reason)


class GraphRunner(FusedRunner):
    """The fused-graph runner (export.runner) on the engine's session, with what the engine
    reports about it: which provider runs it and why."""

    def __init__(self, session: ort.InferenceSession, info: SessionInfo, slots: int) -> None:
        device = "cuda" if info.provider == "cuda" else "cpu"
        super().__init__(session, slots, device=device, cuda_graphs=info.cuda_graphs)
        self.info = info
