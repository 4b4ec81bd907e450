"""export.runner.FusedRunner: one-slot prefill through pointers into the shared KV buffers,
decode over a range of rows, bindings made once per range; on CUDA without a GPU, a recording
fake of ORT's IO binding shows what a device run would see; CUDA-graph buckets, fixed addresses
and fixed shapes."""

from __future__ import annotations

import ctypes
import itertools
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

import export.runner as runner_module
from export.runner import FusedRunner, bucket_for, cpu_session, decode_buckets
from tests.fused.conftest import MAX_CONTEXT

VOCAB, HEADS, HEAD_DIM, LAYERS = 128, 2, 16, 2
CPU_INPUTS = {"total_sequence_length"}  # GroupQueryAttention reads it on the host, even on CUDA
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


class FakeDeviceValue:
    """Device memory: a numpy array at a fake address that never changes."""

    _next = itertools.count(1)
    live: ClassVar[list[FakeDeviceValue]] = []

    def __init__(self, shape, dtype) -> None:
        self.mem = np.zeros(shape, dtype)
        self.base = (1 << 44) + next(self._next) * (1 << 32)
        FakeDeviceValue.live.append(self)

    def data_ptr(self) -> int:
        return self.base

    def update_inplace(self, array: np.ndarray) -> None:
        assert array.shape == self.mem.shape and array.dtype == self.mem.dtype
        self.mem[...] = array

    def numpy(self) -> np.ndarray:
        return self.mem.copy()

    @classmethod
    def at(cls, ptr: int, nbytes: int) -> np.ndarray:
        for v in cls.live:
            if v.base <= ptr < v.base + v.mem.nbytes:
                return v.mem.reshape(-1).view(np.uint8)[ptr - v.base : ptr - v.base + nbytes]
        raise AssertionError(f"no device memory at {ptr:#x}")


class FakeBinding:
    """ORT's IOBinding as it behaves with a CUDA session: a host buffer bound to an input the
    device consumes is copied when it is bound; device memory (and host inputs of host
    kernels) are read when the session runs."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.inputs: dict[str, tuple] = {}
        self.outputs: dict[str, tuple] = {}

    def bind_input(self, name, device, device_id, dtype, shape, ptr) -> None:
        spec = (np.dtype(dtype), tuple(shape), ptr)
        if device == "cpu" and self.device == "cuda" and name not in CPU_INPUTS:
            self.inputs[name] = ("copied", spec, _host(ptr, spec).copy())
        else:
            self.inputs[name] = (device, spec, None)

    def bind_output(self, name, device, device_id, dtype, shape, ptr) -> None:
        self.outputs[name] = (device, (np.dtype(dtype), tuple(shape), ptr))

    def bind_ortvalue_output(self, name, value) -> None:
        self.outputs[name] = ("value", value)

    def read(self, name: str) -> np.ndarray:
        where, (dtype, shape, ptr), copy = self.inputs[name]
        if where == "copied":
            return copy
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = FakeDeviceValue.at(ptr, nbytes) if where == "cuda" else _host(ptr, (dtype, shape))
        return np.frombuffer(raw.tobytes(), dtype).reshape(shape)


def _host(ptr: int, spec: tuple) -> np.ndarray:
    dtype, shape = spec[0], spec[1]
    raw = ctypes.string_at(ptr, int(np.prod(shape)) * dtype.itemsize)
    return np.frombuffer(raw, dtype).reshape(shape)


class FakeSession:
    """The fused graph's I/O; a run records what it saw and writes logits whose argmax is the
    row's input token (so the test sees the logits come back too)."""

    def __init__(self, device: str, positions: bool = False) -> None:
        self.device = device
        names = ["input_ids", "seqlens_k", "total_sequence_length", "last_index"]
        names += ["position_ids"] if positions else []
        kv = SimpleNamespace(type="tensor(float16)", shape=["batch", HEADS, 64, HEAD_DIM])
        self._inputs = [SimpleNamespace(name=n, type="", shape=[]) for n in names]
        for i in range(LAYERS):
            for kind in ("key", "value"):
                self._inputs.append(SimpleNamespace(name=f"past_key_values.{i}.{kind}", **vars(kv)))
        self.runs: list[dict] = []

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return [SimpleNamespace(name="logits", shape=["batch", VOCAB])]

    def io_binding(self) -> FakeBinding:
        return FakeBinding(self.device)

    def run_with_iobinding(self, binding: FakeBinding, run_options=None) -> None:
        seen = {n: binding.read(n) for n in binding.inputs if not n.startswith("past_")}
        seen["ptr"] = {n: spec[2] for n, (_, spec, _) in binding.inputs.items()}
        seen["graph_id"] = run_options.get_run_config_entry("gpu_graph_id") if run_options else None
        self.runs.append(seen)
        ids = seen["input_ids"][:, -1]
        logits = np.zeros((len(ids), VOCAB), np.float32)
        logits[np.arange(len(ids)), ids] = 1.0
        where, out = binding.outputs["logits"]
        seen["logits_on"] = where
        if where == "value":  # device memory
            out.mem[...] = logits
        else:  # a host buffer: ORT copies the output there after the run
            assert out[1] == logits.shape and out[0] == logits.dtype
            ctypes.memmove(out[2], logits.ctypes.data, logits.nbytes)


@pytest.fixture
def fake_device(monkeypatch):
    FakeDeviceValue.live.clear()
    monkeypatch.setattr(runner_module, "device_value", lambda s, d, dev: FakeDeviceValue(s, d))


def test_every_decode_step_reaches_the_device(fake_device):
    session = FakeSession("cuda", positions=True)
    runner = FusedRunner(session, slots=4, device="cuda")
    steps = [((0, 2), [5, 6], [3, 4]), ((0, 2), [7, 8], [4, 5]), ((1, 2), [9, 10], [5, 6])]
    steps += [((0, 2), [11, 12], [6, 7])]
    for (first, n), ids, lengths in steps:
        runner.ids[first : first + n, 0] = ids
        runner.seqlens[first : first + n] = lengths
        logits = runner.decode(first, n)
        seen = session.runs[-1]
        assert seen["input_ids"][:, 0].tolist() == ids  # not the first step's tokens
        assert seen["seqlens_k"].tolist() == lengths
        assert seen["position_ids"][:, 0].tolist() == lengths
        assert seen["last_index"].tolist() == [0] * n
        assert int(seen["total_sequence_length"]) == max(lengths) + 1
        assert seen["logits_on"] == "cpu"  # host rows (ORT copies them after the run)
        assert logits[first : first + n].argmax(-1).tolist() == ids
    # the decode bindings are made once per row range, not per step
    assert len(runner._decode_bindings) == 2


def test_the_fake_catches_host_inputs_bound_once(fake_device):
    """What the runner must avoid: a host array bound once to a device input stays the first
    step's value on CUDA (the bug that made decode feed stale tokens)."""
    session = FakeSession("cuda")
    binding, ids = session.io_binding(), np.array([[5]], np.int64)
    binding.bind_input("input_ids", "cpu", 0, np.int64, [1, 1], ids.ctypes.data)
    ids[0, 0] = 7
    assert binding.read("input_ids").tolist() == [[5]]


def test_prefill_on_cuda_is_bound_fresh_and_never_captured(fake_device):
    session = FakeSession("cuda")
    runner = FusedRunner(session, slots=2, device="cuda", cuda_graphs=True)
    assert runner.prefill(1, np.array([3, 4, 5]), 2).argmax() == 5
    seen = session.runs[-1]
    assert seen["input_ids"].tolist() == [[3, 4, 5]] and seen["seqlens_k"].tolist() == [4]
    assert seen["last_index"].tolist() == [2] and seen["graph_id"] == "-1"


def test_decode_buckets():
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(1) == (1,)
    assert [bucket_for(decode_buckets(64), n) for n in (1, 2, 3, 5, 33, 64)] == [
        1, 2, 4, 8, 64, 64,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(decode_buckets(6), 7)


def test_cuda_graph_steps_replay_fixed_shapes_at_fixed_addresses(fake_device):
    session = FakeSession("cuda")
    runner = FusedRunner(session, slots=6, device="cuda", cuda_graphs=True)
    pointers: dict[int, dict] = {}
    ranges = [(0, 1), (2, 1), (1, 1), (0, 3), (1, 4), (0, 6), (3, 1), (0, 1)]
    for step, (first, n) in enumerate(ranges):
        lo, hi = runner.span(first, n)
        assert lo == 0 and hi == bucket_for(runner.buckets, first + n)
        runner.ids[lo:hi, 0] = np.arange(hi) + 10 * step
        runner.seqlens[lo:hi] = np.arange(hi) + step
        logits = runner.decode(first, n)
        seen = session.runs[-1]
        assert len(seen["input_ids"]) == hi  # rows 0..bucket-1, whatever rows are decoding
        assert seen["input_ids"][:, 0].tolist() == (np.arange(hi) + 10 * step).tolist()
        assert int(seen["total_sequence_length"]) == runner.max_context  # held fixed
        assert seen["graph_id"] == str(runner.buckets.index(hi))
        assert pointers.setdefault(hi, seen["ptr"]) == seen["ptr"]  # the same addresses
        assert seen["logits_on"] == "value"  # device memory at a fixed address, then copied
        assert logits[:hi].argmax(-1).tolist() == (np.arange(hi) + 10 * step).tolist()
    assert sorted(pointers) == [1, 2, 4, 6]
    assert len(runner._decode_bindings) == 4  # one per bucket


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fixed_shape_decode_gives_the_same_logits_on_the_cpu(kind, fused_graph):
    """total_sequence_length at max_context and ride-along rows change nothing: the captured
    form of a step computes what the plain one does."""
    graph = fused_graph(kind, "fp32").SerializeToString()
    out = {}
    for graphs in (False, True):
        runner = FusedRunner(cpu_session(graph, threads=2), slots=5, cuda_graphs=graphs)
        rng = np.random.default_rng(0)
        lengths = np.array([3, 7, 0, 5, 2])
        for slot, n in enumerate(lengths):
            if n:
                runner.prefill(slot, rng.integers(3, 300, n), 0)
        steps = []
        for step in range(4):
            runner.ids[:, 0] = rng.integers(3, 300, 5)
            runner.seqlens[:] = lengths + step
            steps.append(runner.decode(1, 3)[1:4].copy())
        out[graphs] = np.array(steps)
        assert runner.span(1, 3) == ((0, 4) if graphs else (1, 4))
    np.testing.assert_array_equal(out[True], out[False])
    assert runner.max_context == MAX_CONTEXT
