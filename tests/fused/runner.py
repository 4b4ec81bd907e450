"""A minimal IO-binding loop over the fused graph for tests: one shared KV buffer per layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


class FusedRunner:
    """A fused graph with KV buffers [slots, kv_heads, max_context, head_dim] as past + present."""

    def __init__(self, model: onnx.ModelProto, slots: int) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_positions = "position_ids" in inputs
        kv = inputs["past_key_values.0.key"]
        _, heads, self.max_context, head_dim = kv.shape
        dtype = np.float16 if kv.type == "tensor(float16)" else np.float32
        self.kv = {
            name: np.zeros((slots, heads, self.max_context, head_dim), dtype)
            for name in inputs
            if name.startswith("past_key_values.")
        }
        self.lengths = np.zeros(slots, np.int64)  # tokens cached per slot

    def run(
        self, ids: np.ndarray, counts: list[int] | None = None, slot: int | None = None
    ) -> np.ndarray:
        """Feed ids [rows, S] (row r: counts[r] real tokens, right-padded) on top of the cache.

        rows are all slots, or the one `slot` (then on a view of its buffers: chunked prefill).
        Returns logits [rows, vocab] for each row's last real token.
        """
        ids = np.asarray(ids, np.int64)
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        counts_arr = np.full(ids.shape[0], ids.shape[1]) if counts is None else np.asarray(counts)
        past = self.lengths[rows]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if self.has_positions:
            positions = past[:, None] + np.arange(ids.shape[1])[None, :]
            binding.bind_cpu_input("position_ids", np.minimum(positions, self.max_context - 1))
        binding.bind_cpu_input("seqlens_k", (past + counts_arr - 1).astype(np.int32))
        binding.bind_cpu_input(
            "total_sequence_length", np.array((past + counts_arr).max(), np.int32)
        )
        binding.bind_output("logits")
        for name, buf in self.kv.items():
            value = ort.OrtValue.ortvalue_from_numpy(buf[rows])  # a view: no copy
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(binding)
        self.lengths[rows] += counts_arr
        return binding.copy_outputs_to_cpu()[0]
