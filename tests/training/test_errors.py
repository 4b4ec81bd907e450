"""Bad input to train / finetune / eval: one-line error, exit status 2, nothing at OUT_DIR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.__main__ import main


def bad_data(tmp_path: Path, kind: str) -> tuple[str, str]:
    """A data spec for each kind of bad input, and what its error must say."""
    if kind == "empty-jsonl":
        (tmp_path / "empty.jsonl").write_text("\n")
        return str(tmp_path / "empty.jsonl"), "empty.jsonl: no conversations"
    if kind == "empty-text":
        (tmp_path / "empty.txt").write_text("  \n\n")
        return str(tmp_path / "empty.txt"), "empty.txt: empty text file"
    if kind == "malformed-line":
        good = json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        (tmp_path / "bad.jsonl").write_text(good + "\n" + '{"messages": [\n')
        return str(tmp_path / "bad.jsonl"), "bad.jsonl:2: invalid JSON"
    if kind == "bad-role":
        record = {"messages": [{"role": "bot", "content": "hi"}]}
        (tmp_path / "role.jsonl").write_text(json.dumps(record) + "\n")
        return str(tmp_path / "role.jsonl"), "role.jsonl:1: message 0 has role 'bot'"
    if kind == "unknown-spec":
        return "nosuchdataset", "unknown data spec 'nosuchdataset'"
    if kind == "unknown-language":
        return "chatterbot:klingon", "chatterbot:klingon: unknown language; available:"
    raise ValueError(kind)


def assert_one_line_error(capsys, needle: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0]
    assert not captured.out.strip()


KINDS = [
    "empty-jsonl",
    "empty-text",
    "malformed-line",
    "bad-role",
    "unknown-spec",
    "unknown-language",
]


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_bad_data(tiny_llama_dir, tmp_path, capsys, kind):
    spec, needle = bad_data(tmp_path, kind)
    out = tmp_path / "out"
    assert main(["finetune", str(tiny_llama_dir), "--data", spec, "--out", str(out)]) == 2
    assert_one_line_error(capsys, needle)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("kind", ["empty-text", "unknown-spec", "malformed-line"])
def test_train_bad_data(tmp_path, capsys, kind):
    spec, needle = bad_data(tmp_path, kind)
    out = tmp_path / "out"
    assert main(["train", "--data", spec, "--out", str(out)]) == 2
    assert_one_line_error(capsys, needle)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("kind", ["empty-jsonl", "unknown-spec"])
def test_eval_bad_data(tiny_llama_dir, tmp_path, capsys, kind):
    spec, needle = bad_data(tmp_path, kind)
    assert main(["eval", str(tiny_llama_dir), "--data", spec, "--json"]) == 2
    assert_one_line_error(capsys, needle)


def test_missing_base_dir(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        )
        + "\n"
    )
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    assert main(["finetune", str(missing), "--data", str(data), "--out", str(out)]) == 2
    assert_one_line_error(capsys, f"{missing}: no such checkpoint")
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert main(["eval", str(missing), "--data", str(data)]) == 2
    assert_one_line_error(capsys, f"{missing}: no such checkpoint")


def test_bad_numbers(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", str(tiny_llama_dir), "--data", "chatterbot:english", "--out", str(out)]
    assert main([*argv, "--batch-size", "0"]) == 2
    assert_one_line_error(capsys, "--batch-size must be at least 1")
    assert not out.exists()


def test_exit_status_of_the_command(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "models",
            "train",
            "--data",
            str(tmp_path / "nope.txt"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.txt'}: no such data file"
    ]
    assert not out.exists()
