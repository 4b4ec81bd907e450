"""The one driver of the fused graph (torch-free): shared KV buffers, IO binding, small inputs.

The graph's I/O contract (docs/architecture.md, "The fused graph") lives here and nowhere else:
the engine, the verifier, the tests and the scripts all run the graph through `FusedRunner`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST = "past_key_values."
PRESENT = "present."
CPU = "CPUExecutionProvider"


def present_name(past: str) -> str:
    """The output bound to the same buffer as a past input: past_key_values.i.k -> present.i.k."""
    return PRESENT + past.removeprefix(PAST)


def cpu_session(graph: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A plain CPU session (verification, tests, scripts); `graph` is a path or model bytes."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=[CPU])


def decode_buckets(slots: int) -> tuple[int, ...]:
    """Row counts a captured decode step runs: 1, 2, 4, ... up to `slots` (and `slots` itself)."""
    sizes, n = [], 1
    while n < slots:
        sizes.append(n)
        n *= 2
    return (*sizes, slots)


def bucket_for(buckets: tuple[int, ...], rows: int) -> int:
    """The smallest bucket that holds `rows` rows."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def device_value(shape: tuple[int, ...], dtype: type, device: str) -> ort.OrtValue:
    """A tensor allocated once in `device` memory (its address never changes)."""
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)


def _run_options(graph_id: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: run without a graph
    return options


class FusedRunner:
    """Drives the fused graph over `slots` KV rows that live as long as the runner.

    One buffer per layer and kind, [slots, kv_heads, max_context, head_dim], is bound both as
    past input and present output (GroupQueryAttention writes the new entries in place). Any run
    covers consecutive rows through pointers into those buffers: a decode step runs the rows of
    the active slots, a prefill chunk runs one slot.

    Decode inputs are arrays the caller writes (`ids`, `seqlens`); their bindings are made once
    per row range, so a step allocates nothing. On the CPU the binding points at those arrays.
    On CUDA it points at device copies allocated once and refreshed in place before every step
    (ORT copies a host input to the device when it is bound, not when the session runs).

    `cuda_graphs`: decode steps run fixed shapes that a CUDA graph can capture, one graph per
    bucket of rows (1, 2, 4, ... slots; `gpu_graph_id` is the bucket's index): rows 0..bucket-1
    at fixed addresses, with `total_sequence_length` held at max_context. Prefill is not
    captured. The session must have been created with `enable_cuda_graph` (bot.engine.session).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        slots: int,
        device: str = "cpu",
        cuda_graphs: bool = False,
    ) -> None:
        self.session, self.slots, self.device = session, slots, device
        inputs = {i.name: i for i in session.get_inputs()}
        self.has_positions = "position_ids" in inputs
        self.has_last_index = "last_index" in inputs  # graphs exported before it derive it
        kv = inputs[PAST + "0.key"]
        _, self.kv_heads, self.max_context, self.head_dim = kv.shape
        self.kv_dtype = np.float16 if kv.type == "tensor(float16)" else np.float32
        self.vocab = session.get_outputs()[0].shape[1]
        self.kv_names = sorted(n for n in inputs if n.startswith(PAST))
        shape = (slots, self.kv_heads, self.max_context, self.head_dim)
        self.slot_bytes = int(np.prod(shape[1:])) * np.dtype(self.kv_dtype).itemsize
        self.kv_bytes = self.slot_bytes * slots * len(self.kv_names)  # every layer, key and value
        self._kv: dict[str, np.ndarray | ort.OrtValue] = {}  # keeps the buffers alive
        self._kv_ptr: dict[str, int] = {}
        for name in self.kv_names:
            if device == "cpu":
                buf = np.zeros(shape, self.kv_dtype)
                self._kv[name], self._kv_ptr[name] = buf, buf.ctypes.data
            else:
                value = device_value(shape, self.kv_dtype, device)
                self._kv[name], self._kv_ptr[name] = value, value.data_ptr()
        # decode inputs (the rows of a step are used) and outputs
        self.ids = np.zeros((slots, 1), np.int64)
        self.positions = np.zeros((slots, 1), np.int64)
        self.seqlens = np.zeros(slots, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((slots, self.vocab), np.float32)
        self._small: dict[str, np.ndarray] = {"input_ids": self.ids, "seqlens_k": self.seqlens}
        if self.has_positions:
            self._small["position_ids"] = self.positions
        if self.has_last_index:  # a decode step feeds one token: its logits are at index 0
            self._small["last_index"] = np.zeros(slots, np.int64)
        self._on_device: dict[str, ort.OrtValue] = {}
        if device != "cpu":
            for name, array in self._small.items():
                self._on_device[name] = device_value(array.shape, array.dtype.type, device)
        self._device_logits: dict[tuple[int, int], ort.OrtValue] = {}
        self._decode_bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self.buckets = decode_buckets(slots) if cuda_graphs else ()
        self._graph_options = {n: _run_options(i) for i, n in enumerate(self.buckets)}
        self._no_graph = _run_options(-1) if cuda_graphs else None

    # ---- binding helpers ---------------------------------------------------------------------
    @staticmethod
    def _bind_cpu(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False):
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)

    def _bind_kv(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        shape = [rows, self.kv_heads, self.max_context, self.head_dim]
        for name in self.kv_names:
            ptr = self._kv_ptr[name] + first * self.slot_bytes
            binding.bind_input(name, self.device, 0, self.kv_dtype, shape, ptr)
            binding.bind_output(present_name(name), self.device, 0, self.kv_dtype, shape, ptr)

    def _decode_binding(self, first: int, n: int) -> ort.IOBinding:
        binding = self._decode_bindings.get((first, n))
        if binding is not None:
            return binding
        rows = slice(first, first + n)
        binding = self.session.io_binding()
        for name, array in self._small.items():
            if self.device == "cpu":
                self._bind_cpu(binding, name, array[rows])
            else:  # rows first.. of the device copy
                row_bytes = array[0].nbytes
                ptr = self._on_device[name].data_ptr() + first * row_bytes
                shape = [n, *array.shape[1:]]
                binding.bind_input(name, self.device, 0, array.dtype.type, shape, ptr)
        # a CPU input of GroupQueryAttention on every provider: read when the session runs
        self._bind_cpu(binding, "total_sequence_length", self.total)
        if self.device != "cpu" and self.buckets:  # captured: the output at a fixed address too
            value = device_value((n, self.vocab), np.float32, self.device)  # one per bucket
            self._device_logits[first, n] = value
            binding.bind_ortvalue_output("logits", value)
        else:  # ORT copies the logits into these host rows after the run
            self._bind_cpu(binding, "logits", self.logits[rows], output=True)
        self._bind_kv(binding, first, n)
        self._decode_bindings[first, n] = binding
        return binding

    def cached(self, slot: int, length: int) -> dict[str, np.ndarray]:
        """A copy of the first `length` cached entries of `slot`, per KV buffer (CPU runners)."""
        if self.device != "cpu":
            raise ValueError(
                "cached() reads host buffers; this runner keeps its cache on the device"
            )
        return {name: buf[slot, :, :length].copy() for name, buf in self._kv.items()}

    # ---- running -----------------------------------------------------------------------------
    def span(self, first: int, n: int) -> tuple[int, int]:
        """The rows [lo, hi) that a decode step for rows first..first+n-1 runs: those rows, or
        with CUDA graphs rows 0..bucket-1. The caller gives every row in the span a token and its
        cached length (a row that is not generating writes one entry after what it holds)."""
        if not self.buckets:
            return first, first + n
        return 0, bucket_for(self.buckets, first + n)

    def decode(self, first: int, n: int) -> np.ndarray:
        """One token for each row of `span(first, n)`, from `ids` and `seqlens` (the tokens and
        the cached lengths, written there by the caller).

        Returns the logits of all slots [slots, V]: rows outside the span are stale (a buffer
        the next step overwrites).
        """
        lo, hi = self.span(first, n)
        rows = slice(lo, hi)
        if self.has_positions:
            self.positions[rows, 0] = self.seqlens[rows]
        # with CUDA graphs a captured step's shapes and host scalars never change
        self.total[...] = self.max_context if self.buckets else int(self.seqlens[rows].max()) + 1
        for name, value in self._on_device.items():
            value.update_inplace(self._small[name])
        binding = self._decode_binding(lo, hi - lo)
        self.session.run_with_iobinding(binding, self._graph_options.get(hi - lo))
        if (lo, hi - lo) in self._device_logits:
            self.logits[rows] = self._device_logits[lo, hi - lo].numpy()
        return self.logits

    def run(
        self,
        first: int,
        ids: np.ndarray,
        past: np.ndarray | list[int],
        counts: np.ndarray | list[int] | None = None,
    ) -> np.ndarray:
        """Feed ids [rows, S] to rows first..first+rows-1 on top of their `past` cached tokens.

        Row r holds counts[r] real tokens (default S), right-padded; the padding writes entries
        after the row's real ones, which the next run overwrites. Returns new logits [rows, V]
        of each row's last real token. Bound fresh from host arrays (copied to the device at
        binding, just before the run) and never captured in a CUDA graph.
        """
        ids = np.ascontiguousarray(ids, np.int64)
        rows, s = ids.shape
        past = np.asarray(past, np.int64)
        counts = np.full(rows, s) if counts is None else np.asarray(counts, np.int64)
        if first < 0 or first + rows > self.slots:
            raise ValueError(f"rows {first}..{first + rows - 1} are not in 0..{self.slots - 1}")
        ends = past + counts
        if ends.max() > self.max_context:
            raise ValueError(f"{int(ends.max())} tokens do not fit max_context {self.max_context}")
        small = {
            "input_ids": ids,
            "seqlens_k": (ends - 1).astype(np.int32),
            "total_sequence_length": np.array(ends.max(), np.int32),
        }
        if self.has_positions:
            positions = past[:, None] + np.arange(s)[None, :]
            small["position_ids"] = np.minimum(positions, self.max_context - 1)
        if self.has_last_index:
            small["last_index"] = counts - 1
        logits = np.zeros((rows, self.vocab), np.float32)
        binding = self.session.io_binding()
        for name, array in small.items():
            self._bind_cpu(binding, name, array)
        self._bind_cpu(binding, "logits", logits, output=True)
        self._bind_kv(binding, first, rows)
        self.session.run_with_iobinding(binding, self._no_graph)
        return logits

    def prefill(self, slot: int, tokens: np.ndarray, past: int) -> np.ndarray:
        """Feed `tokens` to one slot on top of its `past` cached tokens; logits [V] of the last."""
        return self.run(slot, np.asarray(tokens, np.int64)[None], [past])[0]

    def release(self) -> None:
        """Drop the session and the buffers (after a hot swap)."""
        self._decode_bindings.clear()
        self._device_logits.clear()
        self._on_device.clear()
        self._kv.clear()
        self._kv_ptr.clear()
        self.session = None  # type: ignore[assignment]
