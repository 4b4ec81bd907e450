"""export.runner.FusedRunner on a CPU session from an in-memory graph, tracking slot lengths."""

from __future__ import annotations

import numpy as np
import onnx

from export.runner import FusedRunner, cpu_session


class TrackedRunner:
    """`run(ids, counts, slot)` feeds all slots (or one) on top of what each already holds."""

    def __init__(self, model: onnx.ModelProto, slots: int) -> None:
        self.runner = FusedRunner(cpu_session(model.SerializeToString(), threads=2), slots)
        self.lengths = np.zeros(slots, np.int64)  # tokens cached per slot

    def run(
        self, ids: np.ndarray, counts: list[int] | None = None, slot: int | None = None
    ) -> np.ndarray:
        """Feed ids [rows, S] (row r: counts[r] real tokens, right-padded) on top of the cache:
        rows are all slots, or the one `slot`. Returns logits [rows, vocab] of each row's last
        real token."""
        ids = np.asarray(ids, np.int64)
        first = 0 if slot is None else slot
        rows = slice(first, first + ids.shape[0])
        counts_arr = np.full(ids.shape[0], ids.shape[1]) if counts is None else np.asarray(counts)
        logits = self.runner.run(first, ids, self.lengths[rows], counts_arr)
        self.lengths[rows] += counts_arr
        return logits
