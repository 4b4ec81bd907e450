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


class FusedRunner:
    """Drives the fused graph over `slots` KV rows that live as long as the runner.

    One buffer per layer and kind, [slots, kv_heads, max_context, head_dim], is bound both as
    past input and present output (GroupQueryAttention writes the new entries in place). Any run
    covers consecutive rows first..first+n-1 through pointers into those buffers: a decode step
    runs the rows of the active slots, a prefill chunk runs one slot. Decode inputs are
    preallocated arrays the caller writes (`ids`, `seqlens`), and decode bindings are made once
    per row range, so a step allocates nothing.
    """

    def __init__(self, session: ort.InferenceSession, slots: int, device: str = "cpu") -> None:
        self.session, self.slots, self.device = session, slots, device
        inputs = {i.name: i for i in session.get_inputs()}
        self.has_positions = "position_ids" in inputs
        kv = inputs[PAST + "0.key"]
        _, self.kv_heads, self.max_context, self.head_dim = kv.shape
        self.kv_dtype = np.float16 if kv.type == "tensor(float16)" else np.float32
        self.vocab = session.get_outputs()[0].shape[1]
        self.kv_names = sorted(n for n in inputs if n.startswith(PAST))
        shape = (slots, self.kv_heads, self.max_context, self.head_dim)
        self.slot_bytes = int(np.prod(shape[1:])) * np.dtype(self.kv_dtype).itemsize
        self._kv: dict[str, np.ndarray | ort.OrtValue] = {}  # keeps the buffers alive
        self._kv_ptr: dict[str, int] = {}
        for name in self.kv_names:
            if device == "cuda":
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                self._kv[name], self._kv_ptr[name] = value, value.data_ptr()
            else:
                buf = np.zeros(shape, self.kv_dtype)
                self._kv[name], self._kv_ptr[name] = buf, buf.ctypes.data
        # decode inputs (rows first..first+n-1 are used) and outputs
        self.ids = np.zeros((slots, 1), np.int64)
        self.positions = np.zeros((slots, 1), np.int64)
        self.seqlens = np.zeros(slots, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((slots, self.vocab), np.float32)
        self._decode_bindings: dict[tuple[int, int], ort.IOBinding] = {}

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

    def cached(self, slot: int, length: int) -> dict[str, np.ndarray]:
        """A copy of the first `length` cached entries of `slot`, per KV buffer (CPU runners)."""
        if self.device != "cpu":
            raise ValueError(
                "cached() reads host buffers; this runner keeps its cache on the device"
            )
        return {name: buf[slot, :, :length].copy() for name, buf in self._kv.items()}

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
        of each row's last real token.
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
        logits = np.zeros((rows, self.vocab), np.float32)
        binding = self.session.io_binding()
        for name, array in small.items():
            self._bind_cpu(binding, name, array)
        self._bind_cpu(binding, "logits", logits, output=True)
        self._bind_kv(binding, first, rows)
        self.session.run_with_iobinding(binding)
        return logits

    def prefill(self, slot: int, tokens: np.ndarray, past: int) -> np.ndarray:
        """Feed `tokens` to one slot on top of its `past` cached tokens; logits [V] of the last."""
        return self.run(slot, np.asarray(tokens, np.int64)[None], [past])[0]

    def release(self) -> None:
        """Drop the session and the KV buffers (after a hot swap)."""
        self._decode_bindings.clear()
        self._kv.clear()
        self._kv_ptr.clear()
        self.session = None  # type: ignore[assignment]
