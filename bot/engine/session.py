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


@dataclass(frozen=True)
class SessionInfo:
    """Which provider runs the graph, reported by the CLI and the bench."""

    provider: str  # "cuda" or "cpu"
    threads: int  # intra-op threads on the CPU provider (0 on CUDA)
    fallback_reason: str | None = None  # why CUDA was requested but the CPU runs


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


def create_session(
    graph: Path, device: str = "auto", threads: int | None = None, spin: bool = False
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session on CUDA when asked for (or `auto`) and usable, else on the CPU, with a warning
    when CUDA was asked for explicitly and could not start."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    reason = None
    if device in ("auto", "cuda"):
        if CUDA not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider"
        else:
            preload_cuda_libraries()
            # ORT prints its own errors while probing CUDA; we report the outcome ourselves
            ort.set_default_logger_severity(4)
            try:
                # no TF32: an fp32 graph gives the CPU's greedy tokens (fp16 graphs never use it)
                cuda = (CUDA, {"device_id": "0", "use_tf32": "0"})
                session = ort.InferenceSession(str(graph), _options(0), providers=[cuda, CPU])
                if session.get_providers()[0] == CUDA:
                    log.info("engine: CUDA provider for %s", graph)
                    return session, SessionInfo("cuda", 0)
                reason = "the CUDA provider could not initialise (no usable GPU)"
            except Exception as exc:  # ORT raises RuntimeError/Fail subclasses here
                reason = f"CUDA session failed: {str(exc).splitlines()[0][:200]}"
            finally:
                ort.set_default_logger_severity(2)
        if device == "cuda":
            log.warning("engine: CUDA requested but unavailable (%s); running on the CPU", reason)
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
        super().__init__(session, slots, device="cuda" if info.provider == "cuda" else "cpu")
        self.info = info
