"""`python -m bot run`: an operator's mistake is one line on stderr and exit 2, never a traceback;
the database and the model are checked before Discord is contacted; the token stays out of logs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEy.fake-token.abcdefghijklmnopqrstuvwxyz"
UNREACHABLE = "http://127.0.0.1:9/api/v10"  # nothing listens there: login fails at once


@pytest.fixture
def registry(tiny_registry, tmp_path: Path) -> Path:
    """A private copy of the tiny registry, free to break."""
    root = tmp_path / "registry"
    shutil.copytree(tiny_registry.root, root)
    return root


def run(tmp_path: Path, registry: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(tmp_path),
        "MODEL_REGISTRY": str(registry),
        "DEVICE": "cpu",
        "DISCORD_TOKEN": TOKEN,
        "DISCORD_API_BASE": UNREACHABLE,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "bot", "run", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
    )


def one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0]


def _version(registry: Path) -> Path:
    return registry / "tiny" / "v1"


def test_a_garbage_manifest_is_one_line(tmp_path, registry):
    (_version(registry) / "manifest.json").write_text("{not json", encoding="utf-8")
    one_line_error(run(tmp_path, registry), "manifest.json")


def test_a_missing_graph_is_one_line(tmp_path, registry):
    (_version(registry) / "model.onnx").unlink()
    one_line_error(run(tmp_path, registry), "model.onnx")


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("not a url at all", "invalid database URL"),
        ("nosuchdb+nosuchdriver://x/y", "cannot use database"),
        ("postgresql+nosuchdriver://u:secret@127.0.0.1/db", "cannot use database"),
    ],
)
def test_a_bad_database_url_is_one_line(tmp_path, registry, url, part):
    result = run(tmp_path, registry, DATABASE_URL=url)
    one_line_error(result, part)
    assert "secret" not in result.stderr


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of our own (root only): to fill it, or make it read-only."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.fail("cannot mount a tmpfs here (the suite runs as root on CI)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_database_on_a_read_only_disk_is_one_line(tmp_path, registry):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = run(tmp_path, registry, DATABASE_URL=f"sqlite+aiosqlite:///{disk}/bot.db")
    one_line_error(result, "cannot", "database")


def test_a_database_on_a_full_disk_is_one_line(tmp_path, registry):
    with tmpfs(tmp_path / "full", "64k") as disk:
        (disk / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))  # what is left: one page
        result = run(tmp_path, registry, DATABASE_URL=f"sqlite+aiosqlite:///{disk}/bot.db")
    one_line_error(result, "cannot use the database", "full")


def test_a_good_setup_gets_as_far_as_discord_and_logs_json_without_the_token(tmp_path, registry):
    """Everything local is fine: the bot opens the database and the model, then fails to reach
    Discord (nothing listens), with JSON log lines at DEBUG that never contain the token."""
    result = run(tmp_path, registry, "--log-level", "debug", LOG_FORMAT="json")
    assert result.returncode == 1, result.stderr
    assert f"error: cannot reach Discord at {UNREACHABLE}" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["level"] == "DEBUG" for e in entries)  # --log-level reached the handler
    assert {"time", "level", "logger", "message"} <= set(entries[0])


def test_log_settings_are_validated(tmp_path, registry):
    one_line_error(run(tmp_path, registry, LOG_LEVEL="LOUD"), "LOG_LEVEL")
