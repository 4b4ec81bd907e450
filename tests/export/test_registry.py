"""Registry: numbering, references, concurrency, crash safety, use/rollback/delete, the pointer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from export.manifest import Manifest
from export.registry import Registry, RegistryError, parse_ref

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def _visible(registry: Registry, name: str) -> list[str]:
    return sorted(p.name for p in (registry.root / name).iterdir())


def test_versions_are_numbered_and_resolved(registry, copy_build):
    infos = [registry.publish(copy_build, "chat") for _ in range(3)]
    assert [i.version for i in infos] == [1, 2, 3]
    assert _visible(registry, "chat") == ["v1", "v2", "v3"]
    assert Manifest.read(infos[1].path).version == 2 and Manifest.read(infos[1].path).name == "chat"
    assert registry.resolve("chat").version == 3
    assert registry.resolve("chat@2").path == registry.root / "chat" / "v2"
    assert registry.resolve(str(infos[0].path)).ref == "chat@1"
    assert [v.ref for v in registry.versions()] == ["chat@1", "chat@2", "chat@3"]
    with pytest.raises(RegistryError, match=r"chat has no version 7 \(versions: 1, 2, 3\)"):
        registry.resolve("chat@7")
    with pytest.raises(RegistryError, match="no model named 'other'"):
        registry.resolve("other")
    with pytest.raises(RegistryError, match="not a model version folder"):
        registry.resolve(str(registry.root))


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "..", "a..b", "", ".hidden", "-x", "x" * 65, "a b"]
)
def test_bad_names_are_refused(registry, copy_build, name):
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.publish(copy_build, name)
    assert not registry.root.exists() or registry.names() == []


def test_concurrent_publishes_in_threads_get_distinct_versions(registry, copy_build):
    barrier = threading.Barrier(6)

    def build(folder: Path) -> None:
        copy_build(folder)
        barrier.wait()  # all six reach the numbering step together

    results, errors = [], []

    def worker() -> None:
        try:
            results.append(registry.publish(build, "chat").version)
        except Exception as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4, 5, 6]


_PUBLISH_WHEN_GO = """
import shutil, sys, time
from pathlib import Path
from export.registry import Registry
root, source, go = sys.argv[1:4]
def build(folder):
    shutil.copytree(source, folder, dirs_exist_ok=True)
    while not Path(go).exists():
        time.sleep(0.01)
print(Registry(root).publish(build, "chat").version)
"""


def test_concurrent_publishes_in_processes_get_distinct_versions(
    registry, published_version, tmp_path
):
    go = tmp_path / "go"
    args = [
        sys.executable,
        "-c",
        _PUBLISH_WHEN_GO,
        str(registry.root),
        str(published_version),
        str(go),
    ]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 30
    while (
        len(
            list((registry.root / "chat").glob(".tmp-*"))
            if (registry.root / "chat").exists()
            else []
        )
        < 2
    ):
        assert time.time() < deadline, "publishers did not start"
        time.sleep(0.05)
    go.touch()
    versions = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    assert versions == [1, 2]


def test_failed_build_leaves_nothing(registry, copy_build):
    def build(folder: Path) -> None:
        copy_build(folder)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        registry.publish(build, "chat")
    assert not (registry.root / "chat").exists()  # a failed first export leaves no trace
    assert registry.versions() == []
    registry.publish(copy_build, "chat")
    with pytest.raises(RuntimeError):
        registry.publish(build, "chat")
    assert _visible(registry, "chat") == ["v1"]


def test_killed_export_leaves_no_visible_version_and_is_cleaned(
    registry, copy_build, published_version
):
    code = (
        "import os, shutil, sys; from export.registry import Registry\n"
        "def build(folder):\n"
        "    shutil.copytree(sys.argv[2], folder, dirs_exist_ok=True)\n"
        "    os._exit(9)  # dies half-way, without cleaning up\n"
        "Registry(sys.argv[1]).publish(build, 'chat')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(registry.root), str(published_version)], cwd=ROOT
    )
    assert proc.returncode == 9
    leftovers = _visible(registry, "chat")
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")
    assert registry.versions() == []
    assert registry.publish(copy_build, "chat").version == 1
    assert _visible(registry, "chat") == ["v1"]  # the dead export's folder was removed


def test_use_rollback_history(registry, copy_build):
    for _ in range(3):
        registry.publish(copy_build, "chat")
    assert registry.active() is None
    registry.use("chat@1")
    registry.use("chat@3")
    assert registry.active().ref == "chat@3"
    assert [v.active for v in registry.versions()] == [False, False, True]
    assert registry.rollback("chat").ref == "chat@1"  # the previously active one, not v2
    pointer = json.loads((registry.root / "active.json").read_text())
    assert pointer == {"name": "chat", "version": 1, "history": [["chat", 1]]}
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("chat")
    registry.use("chat@3")
    registry.use("chat")  # newest = 3 again: no duplicate history entry
    registry.delete("chat@1")
    assert registry.rollback("chat").ref == "chat@2"  # history gone: the next lower version


def test_rollback_needs_the_name_to_be_active(registry, copy_build):
    registry.publish(copy_build, "a")
    registry.publish(copy_build, "b")
    with pytest.raises(RegistryError, match="not active"):
        registry.rollback("a")
    registry.use("b@1")
    with pytest.raises(RegistryError, match=r"not active \(active: b@1\)"):
        registry.rollback("a")


def test_delete_refuses_the_active_version(registry, copy_build):
    registry.publish(copy_build, "chat")
    registry.publish(copy_build, "chat")
    registry.use("chat@2")
    with pytest.raises(RegistryError, match="active version"):
        registry.delete("chat@2")
    assert registry.delete("chat@1").ref == "chat@1"
    assert _visible(registry, "chat") == ["v2"]
    with pytest.raises(RegistryError, match="has no version 1"):
        registry.delete("chat@1")


def test_use_refuses_a_damaged_version(registry, copy_build):
    info = registry.publish(copy_build, "chat")
    (info.path / "model.onnx.data").unlink()
    with pytest.raises(
        RegistryError, match=r"refusing to activate chat@1: .*missing model\.onnx\.data"
    ):
        registry.use("chat@1")
    assert registry.active() is None


def test_pointer_write_is_atomic(registry, copy_build, monkeypatch):
    registry.publish(copy_build, "chat")
    registry.publish(copy_build, "chat")
    registry.use("chat@1")
    before = (registry.root / "active.json").read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        registry.use("chat@2")
    monkeypatch.undo()
    assert (registry.root / "active.json").read_bytes() == before
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", "active.json", "chat"]
    assert registry.active().ref == "chat@1"


def test_dangling_pointer_is_reported(registry, copy_build):
    registry.publish(copy_build, "chat")
    (registry.root / "active.json").write_text('{"name": "chat", "version": 5, "history": []}')
    with pytest.raises(RegistryError, match="points to chat@5, which does not exist"):
        registry.active()


def test_tiny_registry_fixture(tiny_registry):
    active = tiny_registry.active()
    assert active.ref == "tiny@1"
    manifest = active.manifest(verify_hashes=True)
    assert manifest.parity.passed and manifest.architecture.model_type == "llama"


def test_publish_moves_a_finished_folder_in(registry, version_copy):
    info = registry.publish(version_copy, "chat")
    assert info.ref == "chat@1" and not version_copy.exists()
    assert info.manifest(verify_hashes=True).version == 1


def test_default_registry_follows_the_bot_settings(monkeypatch):
    from export.registry import default_registry

    monkeypatch.delenv("MODEL_REGISTRY", raising=False)
    monkeypatch.delenv("DATA_DIR", raising=False)
    assert default_registry() == Path("data/registry")
    monkeypatch.setenv("DATA_DIR", "/srv/bot")
    assert default_registry() == Path("/srv/bot/registry")
    monkeypatch.setenv("MODEL_REGISTRY", "/models")
    assert default_registry() == Path("/models")


def test_names_from_discord_never_resolve_to_paths(registry, copy_build, tmp_path):
    """`resolve_name` and `checked` (what admin commands use) take NAME or NAME@N only."""
    info = registry.publish(copy_build, "chat")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    look_alike = outside / "v1"
    import shutil

    shutil.copytree(info.path, look_alike)
    for ref in (str(look_alike), str(info.path), "../chat/v1", "./chat", "~/x", "chat/v1"):
        with pytest.raises(RegistryError, match="is not a version: give NAME or NAME@N"):
            registry.resolve_name(ref)
        with pytest.raises(RegistryError, match="is not a version"):
            registry.checked(ref)
    assert registry.checked("chat@1").path == info.path
    assert registry.resolve(str(look_alike)).ref == "chat@1"  # operators may still give paths


def test_checked_refuses_a_version_whose_files_changed(registry, copy_build):
    info = registry.publish(copy_build, "chat")
    data = info.path / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(RegistryError, match=r"refusing chat@1: .*model\.onnx\.data"):
        registry.checked("chat@1")


@pytest.mark.parametrize(
    "ref",
    [
        "chat@²",
        "chat@" + "9" * 5000,
        "chat@-1",
        "chat@0",
        "chat@1.0",
        "chat@ 1",
        "chat\n",
        "chat@1\n",
        "chat@１",
        "a" * 5000,
        "chat@v",
        "chat@@1",
        "",
        "ch..at",
    ],
)
def test_references_are_parsed_with_one_strict_pattern(registry, copy_build, ref):
    """Superscript or full-width digits (isdigit() is true for them), a number past Python's
    int-parsing limit, a trailing newline: a one-line RegistryError quoting at most a little."""
    registry.publish(copy_build, "chat")
    with pytest.raises(RegistryError, match="is not a version: give NAME or NAME@N") as caught:
        registry.resolve_name(ref)
    assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)


def test_strict_references_still_take_name_and_name_at_n(registry, copy_build):
    info = registry.publish(copy_build, "chat")
    assert parse_ref("chat") == ("chat", None) and parse_ref("chat@v12") == ("chat", 12)
    assert registry.resolve_name("chat").path == info.path
    assert registry.resolve_name("chat@1").path == registry.resolve_name("chat@v1").path
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.resolve_name("chat@7")
