"""export.runner.FusedRunner: one-slot prefill through pointers into the shared KV buffers,
decode over a range of rows, bindings made once per range."""

from __future__ import annotations

import numpy as np

from export.runner import FusedRunner, cpu_session

PROMPT = np.array([1, 2, 3, 4, 5])


def _runner(fused_graph, slots: int) -> FusedRunner:
    return FusedRunner(cpu_session(fused_graph("llama", "fp32").SerializeToString(), 2), slots)


def test_prefill_writes_only_its_own_slot_and_decode_rows_agree(fused_graph):
    runner = _runner(fused_graph, slots=3)
    ctx = runner.max_context
    logits = runner.prefill(1, PROMPT, 0).copy()
    for name, rows in runner.cached(1, ctx).items():
        assert rows[:, :5].any() and not rows[:, 5:].any(), name
    for slot in (0, 2):
        assert not any(rows.any() for rows in runner.cached(slot, ctx).values())
    # the same tokens through a decode step of every slot continue identically in slot 1
    runner.ids[:, 0], runner.seqlens[:] = [0, 6, 0], [0, 5, 0]
    step = runner.decode(0, 3).copy()
    alone = _runner(fused_graph, slots=1)
    np.testing.assert_allclose(alone.prefill(0, PROMPT, 0), logits, atol=1e-5)
    np.testing.assert_allclose(alone.prefill(0, np.array([6]), 5), step[1], atol=1e-5)
    assert len(runner._decode_bindings) == 1  # the binding is made once per row range
    runner.seqlens[:] += 1
    runner.decode(0, 3)
    assert len(runner._decode_bindings) == 1
    # slot 1 alone (rows 1..1) gives the same logits as a run over every row
    runner.seqlens[:] = [0, 5, 0]
    np.testing.assert_allclose(runner.decode(1, 1)[1], step[1], atol=1e-5)
