"""scripts/gpu_check.py, the one-command GPU check, run on the CPU with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SMALL = ["--tiny", "--streams", "1,3", "--prompt-tokens", "12", "--new-tokens", "6"]


def _check(tmp_path: Path, device: str) -> tuple[int, dict[str, dict], str]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", device, *SMALL]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_check: dict[str, dict] = {}
    for r in records:
        key = r["check"] if r["check"] != "bench" else f"bench/{r['engine']}/{r['streams']}"
        by_check[key] = r
    return done.returncode, by_check, done.stderr


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    rc, checks, err = _check(tmp_path, "cpu")
    assert rc == 0, err[-2000:]
    decode = checks["decode_logits"]
    assert decode["provider"] == "cpu" and decode["passed"] is True
    assert decode["max_rel_error"] < 0.01 and decode["top1_agreement"] >= 0.98
    lengths, chunk = decode["prompt_lengths"], decode["prefill_chunk"]
    assert len(set(lengths)) == len(lengths) >= 3 and max(lengths) > chunk  # ragged, chunked
    assert decode["reused_prefix"] > 0 and decode["compared_rows"] > len(lengths) * 4
    assert checks["engine_greedy"]["batched_equals_alone"] is True
    for engine in ("ours", "transformers"):
        for streams in (1, 3):
            bench = checks[f"bench/{engine}/{streams}"]
            assert bench["decode_tok_s"] > 0 and bench["aggregate_tok_s"] > 0
    assert checks["bench/ours/3"]["precision"] == "fp16"
    summary = checks["summary"]
    assert summary["correct"] is True and summary["provider"] == "cpu"
    ratio = checks["bench/ours/1"]["decode_tok_s"] / checks["bench/transformers/1"]["decode_tok_s"]
    assert summary["one_stream_vs_transformers"] == pytest.approx(ratio, abs=0.01)
    assert summary["streams_3_aggregate_tok_s"] == checks["bench/ours/3"]["aggregate_tok_s"]


def test_a_cpu_fallback_is_not_a_gpu_run(tmp_path):
    rc, checks, err = _check(tmp_path, "cuda")
    if "decode_logits" in checks and checks["decode_logits"]["provider"] == "cuda":
        pytest.skip("a usable GPU: no fallback to provoke")
    assert rc == 1
    summary = {"check": "summary", "device": "cuda", "provider": "cpu", "correct": False}
    assert checks["summary"] == summary
    assert "CUDA was asked for but the CPU ran" in err
    assert not any(k.startswith("bench/") for k in checks)  # no figures from the wrong device
    assert "decode_logits" not in checks
