"""`python -m export`: publishing, registry commands, and every error path (exit 2, one line)."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import export.graph_reference as graph_reference
import export.onnx_graph as onnx_graph
from export.__main__ import main, serving_candidates
from export.manifest import Manifest
from export.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its content) and folder under the registry; unchanged = equal snapshots."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def registry(tmp_path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def seeded(registry, copy_build) -> Path:
    """A registry with chat@1 and chat@2, chat@2 active."""
    reg = Registry(registry)
    reg.publish(copy_build, "chat")
    reg.publish(copy_build, "chat")
    reg.use("chat@2")
    return registry


def test_export_json_and_activate(capsys, registry, tiny_checkpoints):
    code, out, _ = _run(
        capsys,
        tiny_checkpoints["gpt2"],
        "--name",
        "g",
        "--flavour",
        "reference",
        "--registry",
        registry,
        "--activate",
        "--json",
    )
    assert code == 0
    data = json.loads(out.strip().splitlines()[-1])
    assert {k: data[k] for k in ("name", "version", "precision", "flavour", "active")} == {
        "name": "g",
        "version": 1,
        "precision": "fp32",
        "flavour": "reference",
        "active": True,
    }
    assert data["path"] == str(registry / "g" / "v1")
    assert data["parity"]["passed"] and data["parity"]["max_rel_error"] < 1e-4
    onnx_files = [p.name for p in Path(data["path"]).iterdir() if p.suffix == ".onnx"]
    assert onnx_files == ["model.onnx"]
    assert Registry(registry).active().ref == "g@1"


def test_export_as_a_subprocess(registry, tiny_checkpoints, tmp_path):
    """The real entry point; the registry comes from $MODEL_REGISTRY."""
    env = {"MODEL_REGISTRY": str(registry), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            str(tiny_checkpoints["llama"]),
            "--name",
            "sub",
            "--flavour",
            "reference",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["path"] == str(registry / "sub" / "v1")


def test_list_show_use_rollback_delete(capsys, seeded):
    code, out, _ = _run(capsys, "list", "--registry", seeded, "--json")
    data = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and data["active"] == "chat@2"
    assert [(v["name"], v["version"], v["active"]) for v in data["versions"]] == [
        ("chat", 1, False),
        ("chat", 2, True),
    ]
    code, out, _ = _run(capsys, "show", "chat@1", "--registry", seeded, "--verify-hashes", "--json")
    data = json.loads(out.strip().splitlines()[-1])
    assert (
        code == 0
        and data["manifest"]["version"] == 1
        and data["manifest"]["flavour"] == "reference"
    )
    assert "(checked: sizes and sha256)" in out
    assert _run(capsys, "use", "chat@1", "--registry", seeded)[0] == 0
    assert Registry(seeded).active().ref == "chat@1"
    code, out, _ = _run(capsys, "rollback", "chat", "--registry", seeded)
    assert code == 0 and "chat@2" in out
    code, out, _ = _run(capsys, "delete", "chat@1", "--registry", seeded)
    assert code == 0 and not (seeded / "chat" / "v1").exists()


def test_list_prints_a_header_aligned_columns_and_marks_the_active_version(capsys, seeded):
    (seeded / "chat" / "v1" / "manifest.json").write_text("{not json")
    code, out, _ = _run(capsys, "list", "--registry", seeded)
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    assert lines[0].split() == ["VERSION", "FLAVOUR", "PRECISION", "CREATED", "(UTC)"]
    assert lines[1].split() == ["chat@1", "?", "?", "manifest", "unreadable"]
    mark, ref, flavour, precision, day, time = lines[2].split()
    assert (mark, ref, flavour, precision) == ("*", "chat@2", "reference", "fp32")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", day) and re.fullmatch(r"\d\d:\d\d:\d\d", time)
    for column in ("VERSION", "FLAVOUR", "PRECISION", "CREATED"):  # cells start under the header
        start = lines[0].index(column)
        assert all(line[start - 1] == " " and line[start] != " " for line in lines[1:3])
    assert lines[-1] == "* active: chat@2 (python -m export use REF)"


def test_list_of_an_empty_registry_says_so(capsys, registry):
    code, out, _ = _run(capsys, "list", "--registry", registry)
    assert code == 0 and out.strip() == f"no versions in {registry}"


def test_ensure_default_exports_once(capsys, registry, tiny_checkpoints):
    code, out, _ = _run(
        capsys,
        "ensure-default",
        tiny_checkpoints["llama"],
        "--name",
        "tiny",
        "--registry",
        registry,
    )
    assert code == 0 and "published and activated tiny@1" in out
    active = Registry(registry).active()
    manifest = Manifest.read(active.path)
    assert active.ref == "tiny@1" and manifest.flavour == "fused"
    # a random model does not answer README's example, so no quantized candidate passes the
    # quality gate (tests/export/test_gate.py) and fp32 is published, saying why
    assert manifest.precision == "fp32" and manifest.gate is not None
    for precision in serving_candidates():
        assert f"not serving {precision}: quality gate FAILED" in out
    assert "publishing fp32: no quantized version passed the quality gate" in out
    before = _snapshot(registry)
    code, out, _ = _run(
        capsys,
        "ensure-default",
        tiny_checkpoints["llama"],
        "--name",
        "tiny",
        "--registry",
        registry,
    )
    assert code == 0 and "active: tiny@1" in out and "nothing to do" in out
    assert _snapshot(registry) == before


def _perturb_graph(monkeypatch) -> None:
    """Make the reference builder emit a graph with one weight off by noise."""
    build = graph_reference.build_reference_graph

    def corrupted(src):
        tensors = dict(src.tensors)
        name = "model.layers.0.mlp.up_proj.weight"
        tensors[name] = tensors[name] + 0.01 * np.random.default_rng(0).standard_normal(
            tensors[name].shape
        ).astype(np.float32)
        return build(type("Src", (), {"config": src.config, "tensors": tensors})())

    monkeypatch.setattr(graph_reference, "build_reference_graph", corrupted)


def test_failed_parity_refuses_and_force_publishes(capsys, seeded, tiny_checkpoints, monkeypatch):
    _perturb_graph(monkeypatch)
    before = _snapshot(seeded)
    args = [tiny_checkpoints["llama"], "--flavour", "reference", "--registry", seeded]
    for name in ("chat", "new-name"):  # an existing name, and a first export of a name
        code, _, err = _run(capsys, *args, "--name", name)
        assert code == 1
        assert err.startswith("error: parity check failed") and len(err.strip().splitlines()) == 1
        assert _snapshot(seeded) == before
    args += ["--name", "chat"]
    code, out, err = _run(capsys, *args, "--force", "--json")
    assert code == 0
    data = json.loads(out.strip().splitlines()[-1])
    assert data["forced"] is True and data["parity"]["passed"] is False
    assert Manifest.read(Path(data["path"])).forced is True


def _bad_checkpoints(tmp: Path, tiny: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint path, expected text in the error line)."""
    not_ckpt = tmp / "notes.txt"
    not_ckpt.write_text("hello")
    empty = tmp / "empty"
    empty.mkdir()
    bert = Path(shutil.copytree(tiny, tmp / "bert"))
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    corrupt = Path(shutil.copytree(tiny, tmp / "corrupt"))
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {
        "missing": (tmp / "nope", "no such checkpoint"),
        "not-a-checkpoint": (not_ckpt, "not a checkpoint"),
        "empty-folder": (empty, "no config.json"),
        "unsupported": (bert, "supported: "),
        "corrupt": (corrupt, "corrupt"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "not-a-checkpoint", "empty-folder", "unsupported", "corrupt"]
)
def test_bad_checkpoints_exit_2(capsys, seeded, tiny_checkpoints, tmp_path, case):
    path, expected = _bad_checkpoints(tmp_path, tiny_checkpoints["llama"])[case]
    before = _snapshot(seeded)
    code, _, err = _run(
        capsys, path, "--name", "chat", "--flavour", "reference", "--registry", seeded
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert _snapshot(seeded) == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["CKPT", "--name", "../evil"], "invalid model name"),
        (["CKPT", "--name", "a/b"], "invalid model name"),
        (["CKPT", "--name", "x", "--precision", "int4", "--flavour", "reference"], "fp32 only"),
        (["CKPT", "--name", "x", "--precision", "int3"], "invalid choice"),
        (["CKPT", "--name", "x", "--max-context", "100000"], "exceeds"),
        (["CKPT"], "required: --name"),
        (["show", "chat@9"], "no version 9"),
        (["show", "ghost"], "no model named 'ghost'"),
        (["use", "chat@x"], "is not a version: give NAME or NAME@N"),
        (["use", "../chat"], "not a model version folder"),
        (["delete", "chat@2"], "active version"),
        (["delete", "chat"], "explicit version"),
        (["delete", "chat@5"], "no version 5"),
        (["rollback", "ghost"], "not active"),
        (["list", "--bogus"], "unrecognized arguments"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, seeded, tiny_checkpoints, argv, expected):
    argv = [str(tiny_checkpoints["llama"]) if a == "CKPT" else a for a in argv]
    before = _snapshot(seeded)
    code, _, err = _run(capsys, *argv, "--registry", seeded)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert _snapshot(seeded) == before


def test_disk_full_exits_2_and_publishes_nothing(capsys, seeded, tiny_checkpoints, monkeypatch):
    def full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", f"{path}.data")

    monkeypatch.setattr(onnx_graph, "save_model", full)
    before = _snapshot(seeded)
    code, _, err = _run(
        capsys,
        tiny_checkpoints["llama"],
        "--name",
        "chat",
        "--flavour",
        "reference",
        "--registry",
        seeded,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "disk full" in err
    assert _snapshot(seeded) == before
    assert sorted(p.name for p in (seeded / "chat").iterdir()) == ["v1", "v2"]


@pytest.mark.parametrize(("cuda", "candidates"), [(False, ("int8", "int4")), (True, ("fp16",))])
def test_the_default_version_candidates_are_int8_int4_on_a_cpu_and_fp16_with_cuda(
    monkeypatch, cuda, candidates
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert serving_candidates() == candidates
