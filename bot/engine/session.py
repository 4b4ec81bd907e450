"""ONNX Runtime session for the fused graph: provider choice, shared KV buffers, IO binding."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


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


class GraphRunner:
    """Drives the fused graph over `slots` KV rows that live for the whole session.

    One buffer per layer and kind, [slots, kv_heads, max_context, head_dim], is bound both as
    past input and present output (GroupQueryAttention writes new entries in place). A decode
    step runs rows 0..n-1; a prefill chunk runs one slot through pointers into its rows. The small
    inputs are preallocated numpy arrays written in place, and decode bindings are made once per
    row count, so a step allocates nothing.
    """

    def __init__(self, session: ort.InferenceSession, info: SessionInfo, slots: int) -> None:
        self.session, self.info, self.slots = session, info, slots
        inputs = {i.name: i for i in session.get_inputs()}
        self.has_positions = "position_ids" in inputs
        kv = inputs["past_key_values.0.key"]
        _, self.kv_heads, self.max_context, self.head_dim = kv.shape
        self.kv_dtype = np.float16 if kv.type == "tensor(float16)" else np.float32
        self.vocab = session.get_outputs()[0].shape[1]
        self.kv_names = sorted(n for n in inputs if n.startswith("past_key_values."))
        shape = (slots, self.kv_heads, self.max_context, self.head_dim)
        self.slot_bytes = int(np.prod(shape[1:])) * np.dtype(self.kv_dtype).itemsize
        self.device = "cuda" if info.provider == "cuda" else "cpu"
        self._kv_cpu: dict[str, np.ndarray] = {}
        self._kv_gpu: dict[str, ort.OrtValue] = {}
        self._kv_ptr: dict[str, int] = {}
        for name in self.kv_names:
            if self.device == "cuda":
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                self._kv_gpu[name] = value
                self._kv_ptr[name] = value.data_ptr()
            else:
                buf = np.zeros(shape, self.kv_dtype)
                self._kv_cpu[name] = buf
                self._kv_ptr[name] = buf.ctypes.data
        # decode inputs (rows 0..n-1 are used) and outputs
        self.ids = np.zeros((slots, 1), np.int64)
        self.positions = np.zeros((slots, 1), np.int64)
        self.seqlens = np.zeros(slots, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((slots, self.vocab), np.float32)
        self._decode_bindings: dict[tuple[int, int], ort.IOBinding] = {}
        # prefill (one slot) inputs and outputs
        self.chunk_ids = np.zeros((1, self.max_context), np.int64)
        self.chunk_positions = np.zeros((1, self.max_context), np.int64)
        self.chunk_seqlens = np.zeros(1, np.int32)
        self.chunk_total = np.zeros((), np.int32)
        self.chunk_logits = np.zeros((1, self.vocab), np.float32)

    # ---- binding helpers ---------------------------------------------------------------------
    @staticmethod
    def _bind_cpu(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False):
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)

    def _bind_kv(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        shape = [rows, self.kv_heads, self.max_context, self.head_dim]
        for name in self.kv_names:
            ptr = self._kv_ptr[name] + first * self.slot_bytes
            present = name.replace("past_key_values.", "present.")
            binding.bind_input(name, self.device, 0, self.kv_dtype, shape, ptr)
            binding.bind_output(present, self.device, 0, self.kv_dtype, shape, ptr)

    def _decode_binding(self, first: int, n: int) -> ort.IOBinding:
        binding = self._decode_bindings.get((first, n))
        if binding is None:
            rows = slice(first, first + n)
            binding = self.session.io_binding()
            self._bind_cpu(binding, "input_ids", self.ids[rows])
            if self.has_positions:
                self._bind_cpu(binding, "position_ids", self.positions[rows])
            self._bind_cpu(binding, "seqlens_k", self.seqlens[rows])
            self._bind_cpu(binding, "total_sequence_length", self.total)
            self._bind_cpu(binding, "logits", self.logits[rows], output=True)
            self._bind_kv(binding, first, n)
            self._decode_bindings[first, n] = binding
        return binding

    # ---- running -----------------------------------------------------------------------------
    def decode(self, first: int, n: int) -> np.ndarray:
        """One token for each of rows first..first+n-1, from `ids` and `seqlens` (the tokens and
        the cached lengths, written there by the caller).

        Rows that are not generating pass any token; they write one entry at their own length,
        which is beyond what they hold, so nothing they keep is touched. Returns the logits of
        all slots [slots, V] (rows outside the range are stale; a buffer the next step overwrites).
        """
        rows = slice(first, first + n)
        if self.has_positions:
            self.positions[rows, 0] = self.seqlens[rows]
        self.total[...] = int(self.seqlens[rows].max()) + 1
        self.session.run_with_iobinding(self._decode_binding(first, n))
        return self.logits

    def prefill(self, slot: int, tokens: np.ndarray, past: int) -> np.ndarray:
        """Feed `tokens` to one slot on top of its `past` cached tokens; logits [V] of the last."""
        s = len(tokens)
        if past + s > self.max_context:
            raise ValueError(f"{past + s} tokens do not fit max_context {self.max_context}")
        self.chunk_ids[0, :s] = tokens
        self.chunk_seqlens[0] = past + s - 1
        self.chunk_total[...] = past + s
        binding = self.session.io_binding()
        self._bind_cpu(binding, "input_ids", self.chunk_ids[:, :s])
        if self.has_positions:
            self.chunk_positions[0, :s] = np.arange(past, past + s)
            self._bind_cpu(binding, "position_ids", self.chunk_positions[:, :s])
        self._bind_cpu(binding, "seqlens_k", self.chunk_seqlens)
        self._bind_cpu(binding, "total_sequence_length", self.chunk_total)
        self._bind_cpu(binding, "logits", self.chunk_logits, output=True)
        self._bind_kv(binding, slot, 1)
        self.session.run_with_iobinding(binding)
        return self.chunk_logits[0]

    def release(self) -> None:
        """Drop the session and the KV buffers (after a hot swap)."""
        self._decode_bindings.clear()
        self._kv_cpu.clear()
        self._kv_gpu.clear()
        self._kv_ptr.clear()
        self.session = None  # type: ignore[assignment]
