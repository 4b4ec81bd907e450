"""Provider choice and CUDA fallback, the fp16 graph on the CPU provider, loading versions."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from bot.engine import Engine, ModelLoadError, SamplingParams
from bot.engine.loader import load_model
from bot.engine.session import (
    CUDA,
    CUDA_PRECISIONS,
    SessionInfo,
    create_session,
    preload_cuda_libraries,
)
from tests.engine.conftest import run
from tests.engine.fakes import Runners, start_engine

CUDA_USABLE = CUDA in ort.get_available_providers() and ort.get_device() == "GPU"


def _cuda_works(graph) -> bool:
    if not CUDA_USABLE:
        return False
    try:
        return ort.InferenceSession(str(graph), providers=[CUDA]).get_providers()[0] == CUDA
    except Exception:
        return False


def test_cuda_request_falls_back_to_cpu_with_a_warning(engine_registry, caplog):
    graph = load_model("llama", engine_registry.root).graph_path
    if _cuda_works(graph):
        pytest.skip("a GPU is usable here: the fallback path cannot be provoked")
    with caplog.at_level(logging.WARNING, logger="bot.engine.session"):
        session, info = create_session(graph, "cuda")
    assert info.provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    assert info.fallback_reason and "CUDA" in caplog.text and "CPU" in caplog.text


def test_no_cuda_provider_in_the_build(engine_registry, monkeypatch, caplog):
    graph = load_model("llama", engine_registry.root).graph_path
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="bot.engine.session"):
        _, info = create_session(graph, "cuda")
    assert info.provider == "cpu" and "no CUDA provider" in info.fallback_reason
    assert "running on the CPU" in caplog.text


def test_cuda_session_error_falls_back(engine_registry, monkeypatch):
    graph = load_model("llama", engine_registry.root).graph_path
    real = ort.InferenceSession

    def failing(path, options=None, providers=None, **kw):
        if providers and any(CUDA in str(p) for p in providers):
            raise RuntimeError("CUDA failure: out of memory")
        return real(path, options, providers=providers, **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", failing)
    _, info = create_session(graph, "auto", threads=1)
    assert info.provider == "cpu" and info.threads == 1
    assert "out of memory" in info.fallback_reason


def test_cuda_libraries_are_preloaded_once_and_quietly(engine_registry, monkeypatch, capfd):
    graph = load_model("llama", engine_registry.root).graph_path
    calls = []

    def preload():  # what onnxruntime-gpu prints on a machine without pip's CUDA libraries
        calls.append(1)
        print("Failed to load libcublas.so.13: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", preload)
    preload_cuda_libraries.cache_clear()
    try:
        create_session(graph, "cpu")
        assert calls == []  # an explicit CPU run never touches CUDA
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
        create_session(graph, "auto")
        create_session(graph, "auto")
        assert calls == [1]
        assert "libcublas" not in capfd.readouterr().out
    finally:
        preload_cuda_libraries.cache_clear()


def test_auto_and_cpu_pick_the_cpu_here_with_threads(engine_registry):
    graph = load_model("llama", engine_registry.root).graph_path
    session, info = create_session(graph, "cpu")
    assert info.provider == "cpu" and info.threads >= 1
    key = "session.intra_op.allow_spinning"  # off unless asked: the CPU is shared with the bot
    assert session.get_session_options().get_session_config_entry(key) == "0"
    spinning, _ = create_session(graph, "cpu", spin=True)
    options = spinning.get_session_options()
    assert options.get_session_config_entry(key) == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"  # runs only
    with pytest.raises(ValueError, match="unknown device"):
        create_session(graph, "tpu")


def test_engine_requested_on_cuda_still_generates(engine_registry):
    async def go(device):
        engine = await Engine.start("llama", registry=engine_registry.root, device=device, slots=1)
        try:
            r = await engine.generate([1, 2, 3], SamplingParams(greedy=True, max_new_tokens=5))
            return r, engine.session_info
        finally:
            await engine.close()

    (on_cuda, info), (on_cpu, _) = run(go("cuda")), run(go("cpu"))
    assert on_cuda.token_ids == on_cpu.token_ids
    # CUDA was asked for: either it runs, or the CPU runs and the report says why
    assert info.provider == "cuda" or (info.provider == "cpu" and info.fallback_reason)
    assert info.provider == "cpu" and "fp16" in info.fallback_reason  # an fp32 version


def test_fp16_graph_runs_with_fp16_kv_on_the_cpu(tiny_checkpoints, tmp_path, engine_registry):
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path / "reg")
    req = ExportRequest(tiny_checkpoints["llama"], "half", precision="fp16", progress=False)
    export_checkpoint(req, registry)

    async def go(ref, reg):
        runners = Runners()
        engine = await start_engine(reg, ref, slots=2, runners=runners)
        try:
            params = SamplingParams(greedy=True, max_new_tokens=10, ignore_eos=True)
            ids = [(await engine.generate(p, params)).token_ids for p in ([1, 5, 9], [1, 77])]
            return runners.first.kv_dtype, ids
        finally:
            await engine.close()

    kv16, half = run(go("half", registry))
    kv32, full = run(go("llama", engine_registry))
    assert kv16 == np.float16 and kv32 == np.float32
    assert half == full  # the tiny model's fp16 error (~1e-3) does not flip its greedy choice


def test_load_errors_are_one_line(engine_registry, tmp_path, tiny_checkpoints):
    with pytest.raises(ModelLoadError, match="no model named 'nope'"):
        load_model("nope", engine_registry.root)
    with pytest.raises(ModelLoadError, match="no version 9"):
        load_model("llama@9", engine_registry.root)
    with pytest.raises(ModelLoadError, match="no active model"):
        load_model(None, tmp_path / "empty")
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    ref = Registry(tmp_path / "r")
    export_checkpoint(
        ExportRequest(tiny_checkpoints["llama"], "ref", flavour="reference", progress=False), ref
    )
    with pytest.raises(ModelLoadError, match="fused"):
        load_model("ref", ref.root)
    model = load_model(None, engine_registry.root)  # the active version
    assert model.ref == "llama@1" and model.max_context == 256
    assert model.stop_token_ids and model.encode_chat("hi")[-1] != model.encode("hi")[-1]


def test_engine_imports_neither_torch_nor_models_beyond_the_chat_template():
    import subprocess
    import sys

    code = (
        "import sys, bot.engine, bot.engine.cli, bot.engine.bench; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('models.') "
        "and m not in ('models.chat_template', 'models.chat_encoding')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


class _FakeCudaSession:
    """An InferenceSession that says it runs on CUDA (no GPU here), with a given KV type."""

    created: ClassVar[list] = []
    kv_type = "tensor(float16)"
    refuse_graphs = False

    def __init__(self, path, options=None, providers=None, **kw):
        opts = providers[0][1]
        if self.refuse_graphs and opts.get("enable_cuda_graph") == "1":
            raise RuntimeError("CUDA graphs need every node on CUDA")
        _FakeCudaSession.created.append(opts)

    def get_providers(self):
        return [CUDA, "CPUExecutionProvider"]

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name="past_key_values.0.key", type=self.kv_type)]


@pytest.fixture
def fake_cuda(monkeypatch):
    real = ort.InferenceSession

    def session(path, options=None, providers=None, **kw):
        if providers and isinstance(providers[0], tuple) and providers[0][0] == CUDA:
            return _FakeCudaSession(path, options, providers)
        return real(path, options, providers=providers, **kw)

    _FakeCudaSession.created = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(_FakeCudaSession, "kv_type", "tensor(float16)")
    monkeypatch.setattr(_FakeCudaSession, "refuse_graphs", False)
    return _FakeCudaSession


def test_only_fp16_versions_run_on_cuda(engine_registry, fake_cuda, caplog):
    graph = load_model("llama", engine_registry.root).graph_path
    with caplog.at_level(logging.WARNING, logger="bot.engine.session"):
        session, info = create_session(graph, "cuda", threads=1, precision="fp32")
    assert info.provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    assert "fp16" in info.fallback_reason and "attention" in info.fallback_reason
    assert "running on the CPU" in caplog.text  # loud: a warning
    assert fake_cuda.created == []  # an fp32 version never gets a CUDA session
    for precision in ("int8", "int4"):
        assert create_session(graph, "auto", threads=1, precision=precision)[1].provider == "cpu"
    _, info = create_session(graph, "cuda", precision="fp16")
    assert info == SessionInfo("cuda", 0, None, cuda_graphs=True)
    assert fake_cuda.created[-1]["enable_cuda_graph"] == "1"


def test_a_cuda_session_whose_attention_is_not_fp16_is_refused(engine_registry, fake_cuda):
    graph = load_model("llama", engine_registry.root).graph_path
    fake_cuda.kv_type = "tensor(float)"  # a graph that is not what its manifest says
    _, info = create_session(graph, "cuda", threads=1)
    assert info.provider == "cpu" and "attention would run on the CPU" in info.fallback_reason


def test_cuda_without_graphs_when_capture_is_refused(engine_registry, fake_cuda, caplog):
    graph = load_model("llama", engine_registry.root).graph_path
    fake_cuda.refuse_graphs = True
    with caplog.at_level(logging.WARNING, logger="bot.engine.session"):
        _, info = create_session(graph, "cuda", precision="fp16")
    assert info.provider == "cuda" and info.cuda_graphs is False
    assert "no CUDA graphs" in caplog.text


def test_the_default_version_on_a_gpu_is_one_cuda_runs(monkeypatch):
    import torch

    from export.__main__ import serving_candidates

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set(serving_candidates()) <= set(CUDA_PRECISIONS)
