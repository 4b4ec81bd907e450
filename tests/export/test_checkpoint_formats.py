"""Checkpoints as users have them, through the export: sharded bf16/fp16 folders, LoRA adapters,
chat templates given or missing; and the streamed weights (one tensor at a time)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export.weights as weights
from export.onnx_graph import save_model, streamed_weights
from export.pipeline import ExportError, ExportRequest, export_checkpoint
from export.registry import Registry
from export.runner import FusedRunner, cpu_session
from export.weights import load_export_source, reference_logits, reference_model
from models.checkpoint import INDEX_NAME, load_checkpoint
from models.errors import ModelError

KINDS = ("llama", "llama-untied", "qwen2", "gpt2")


def resave(folder: Path, out: Path, dtype: torch.dtype, shard: str | None = None) -> Path:
    """The checkpoint re-saved by transformers in `dtype` (sharded when `shard` is given)."""
    import shutil

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.save_pretrained(out, max_shard_size=shard or "5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, out / name)
    return out


def last_logits(version: Path, ids: np.ndarray) -> np.ndarray:
    runner = FusedRunner(cpu_session(version / "model.onnx"), ids.shape[0])
    return runner.run(0, ids, np.zeros(ids.shape[0], np.int64))


@pytest.mark.parametrize("kind", ["llama", "llama-untied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_folders_load_as_saved(tiny_checkpoints, tmp_path, kind, dtype):
    import transformers

    out = resave(tiny_checkpoints[kind], tmp_path / "ckpt", dtype, shard="40KB")
    assert (out / INDEX_NAME).is_file()
    ckpt = load_checkpoint(out)
    assert len(ckpt.source_files) > 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).state_dict()
    assert set(ckpt.tensors) | {"lm_head.weight"} == set(theirs) | {"lm_head.weight"}
    for name, got in ckpt.tensors.items():
        assert got.dtype == dtype and torch.equal(got, theirs[name]), name


def test_a_sharded_bf16_checkpoint_exports_with_parity(tiny_checkpoints, tmp_path):
    out = resave(tiny_checkpoints["llama-untied"], tmp_path / "ckpt", torch.bfloat16, "40KB")
    req = ExportRequest(out, "bf16", max_context=64, progress=False)
    info, manifest = export_checkpoint(req, Registry(tmp_path / "reg"))
    assert manifest.parity.passed and manifest.parity.max_rel_error < 1e-4
    assert len(manifest.source.files) == len(list(out.glob("*.safetensors")))
    # the graph holds the bf16 weights exactly (as float32)
    ids = np.array([[5, 9, 31, 7, 100, 3]])
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits[:, -1].numpy()
    got = last_logits(info.path, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_a_lora_adapter_exports_as_peft_merges_it(tiny_checkpoints, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a dev dependency (pyproject [dev])")
    import transformers

    base = tiny_checkpoints["llama"]
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    peft_model = peft.get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()
    from export.__main__ import main

    registry = tmp_path / "reg"
    argv = [str(tmp_path / "adapter"), "--base", str(base), "--name", "tuned"]
    assert main([*argv, "--registry", str(registry), "--max-context", "64"]) == 0
    version = Registry(registry).resolve("tuned").path
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    assert [f["name"] for f in manifest["source"]["files"]][-1] == "adapter_model.safetensors"
    ids = np.array([[5, 9, 31, 7, 100, 3], [8, 8, 200, 1, 42, 17]])
    with torch.no_grad():
        want = merged(torch.from_numpy(ids)).logits[:, -1].numpy()
        plain = transformers.AutoModelForCausalLM.from_pretrained(base)(torch.from_numpy(ids))
    got = last_logits(version, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    # and not the base's logits: the adapter was merged
    assert np.abs(got - plain.logits[:, -1].numpy()).max() > 1e-2


def test_adapter_without_a_base_is_one_line_at_the_cli(tiny_checkpoints, tmp_path, capsys):
    peft = pytest.importorskip("peft", reason="peft is a dev dependency (pyproject [dev])")
    import transformers

    from export.__main__ import main

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    adapter = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    # PEFT writes the base's local path when it has one: that path is used (the test above)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoints["llama"])
    config_file.write_text(json.dumps(config | {"base_model_name_or_path": None}))
    capsys.readouterr()  # transformers' loading bar
    code = main([str(tmp_path / "adapter"), "--name", "x", "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--base BASE" in err
    assert not (tmp_path / "reg" / "x").exists()


def test_chat_template_from_a_file_and_a_note_when_there_is_none(
    tiny_checkpoints, tmp_path, capsys
):
    import shutil

    folder = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "plain"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    chatml = config.pop("chat_template")
    config_file.write_text(json.dumps(config))
    registry = Registry(tmp_path / "reg")
    _, manifest = export_checkpoint(
        ExportRequest(folder, "plain", max_context=64, progress=False), registry
    )
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--chat-template FILE" in err
    assert manifest.tokenizer.chat_template is None
    template = tmp_path / "chatml.jinja"
    template.write_text(chatml)
    info, manifest = export_checkpoint(
        ExportRequest(folder, "chat", max_context=256, progress=False, chat_template=template),
        registry,
    )
    assert "has no chat template" not in capsys.readouterr().err
    assert manifest.tokenizer.chat_template == chatml
    assert (info.path / "chat_template.jinja").read_text() == chatml
    assert manifest.tokenizer.stop_tokens[:1] == ["<|im_end|>"]
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ExportError, match="does not render"):
        export_checkpoint(
            ExportRequest(folder, "bad", progress=False, chat_template=broken), registry
        )


@pytest.mark.parametrize("kind", KINDS)
def test_reference_logits_stream_modules_and_equal_the_whole_model(
    tiny_checkpoints, kind, monkeypatch
):
    src = load_export_source(tiny_checkpoints[kind])
    ids = np.random.default_rng(0).integers(0, src.config.vocab_size, (2, 20))
    with torch.no_grad():
        want = reference_model(src)(torch.from_numpy(ids))[0].numpy()

    def whole(*args):
        raise AssertionError("fell back to the whole model")

    monkeypatch.setattr(weights, "_whole_model_logits", whole)
    np.testing.assert_array_equal(reference_logits(src, ids), want)


def test_streamed_graph_equals_the_in_memory_one(tiny_checkpoints, tmp_path):
    from export.graph_fused import build_fused_graph

    src = load_export_source(tiny_checkpoints["llama-untied"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_model(build_fused_graph(src, precision="int4", max_context=32), tmp_path / "a/model.onnx")
    with streamed_weights(tmp_path / "b"):
        streamed = build_fused_graph(src, precision="int4", max_context=32)
    # no weight is held in memory: the large ones are already in the data file
    big = [t.name for t in streamed.graph.initializer if len(t.raw_data) >= 1024]
    assert not big
    save_model(streamed, tmp_path / "b/model.onnx")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.onnx", "model.onnx.data"]
    a, b = (onnx.load(str(tmp_path / f"{x}/model.onnx")) for x in "ab")
    tensors_a = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    tensors_b = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert tensors_a.keys() == tensors_b.keys()
    for name, value in tensors_a.items():
        np.testing.assert_array_equal(tensors_b[name], value)
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(
        last_logits(tmp_path / "b", ids), last_logits(tmp_path / "a", ids)
    )


def test_loaded_checkpoints_read_tensors_when_asked(tiny_checkpoints, monkeypatch):
    """A loaded checkpoint holds no weights: each is read from its file when asked for."""
    import models.checkpoint as checkpoint

    reads = []
    real = checkpoint.safe_open

    def counting(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", counting)
    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    opened = len(reads)
    name = "model.layers.0.mlp.up_proj.weight"
    assert len(ckpt.tensors) > 10 and len(reads) == opened
    assert ckpt.tensors[name].shape == (128, 64)
    assert len(reads) == opened + 1
    with pytest.raises(KeyError):
        ckpt.tensors["lm_head.weight"]
    with pytest.raises(ModelError):
        load_checkpoint(tiny_checkpoints["llama"], base=tiny_checkpoints["llama"])


def test_progress_bars_count_the_tensors_read(tiny_checkpoints, tmp_path, capsys):
    folder = tiny_checkpoints["llama-untied"]
    count = len(load_checkpoint(folder).tensors)
    req = ExportRequest(folder, "bars", flavour="reference", progress=True)
    export_checkpoint(req, Registry(tmp_path / "reg"))
    err = capsys.readouterr().err
    assert re.search(rf"weights: 100%.*{count}/{count}", err)
    assert re.search(rf"verify: 100%.*{count}/{count}", err)


def test_reference_logits_of_every_family_stream_and_equal_the_whole_model(
    family_checkpoints, monkeypatch
):
    def whole(*args):
        raise AssertionError("fell back to the whole model")

    for kind, folder in family_checkpoints.items():
        src = load_export_source(folder)
        ids = np.random.default_rng(1).integers(0, src.config.vocab_size, (2, 40))
        with torch.no_grad():
            want = reference_model(src)(torch.from_numpy(ids))[0].numpy()
        with monkeypatch.context() as patch:
            patch.setattr(weights, "_whole_model_logits", whole)
            got = reference_logits(src, ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=kind)
