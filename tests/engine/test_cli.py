"""`python -m bot generate` and `python -m bot bench` end to end (in-process, tiny models)."""

from __future__ import annotations

import json

from bot.__main__ import main
from bot.engine.bench import percentile
from tests.engine.conftest import torch_greedy


def test_generate_prompt_ids_json_equals_pytorch(engine_registry, torch_models, capsys):
    argv = ["generate", "--registry", str(engine_registry.root), "--model", "gpt2"]
    argv += ["--prompt-ids", "1,20,30,40", "--greedy", "--max-new-tokens", "7", "--ignore-eos"]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["index"] == 0 and record["finish_reason"] == "length"
    assert record["token_ids"] == torch_greedy(torch_models["gpt2"], [1, 20, 30, 40], 7)
    assert {"ttft_ms", "queue_ms", "tokens_per_s", "text"} <= set(record)


def test_generate_jsonl_batch_and_chat(engine_registry, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt_ids": [1, 2, 3]}\n{"prompt": "hello there"}\n\n{"prompt_ids": [1]}\n'
    )
    base = ["generate", "--registry", str(engine_registry.root), "--max-new-tokens", "4"]
    assert main([*base, "--prompt-ids-file", str(prompts), "--greedy", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(r["model"] == "llama@1" and 1 <= r["completion_tokens"] <= 4 for r in records)
    assert main([*base, "--chat", "hi", "--seed", "1", "--temperature", "0.7"]) == 0
    assert "[" in capsys.readouterr().err


def test_generate_bad_input_is_one_line(engine_registry, tmp_path, capsys):
    base = ["generate", "--registry", str(engine_registry.root)]
    assert main([*base, "--prompt-ids", "1,x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --prompt-ids")
    assert main([*base, "--model", "missing", "--prompt", "x"]) == 2
    assert "no model named" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    assert main([*base, "--prompt-ids-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main([*base, "--prompt-ids", "1", "--max-new-tokens", "500"]) == 2
    assert "context" in capsys.readouterr().err


def test_bench_json_last_line(engine_registry, capsys):
    argv = ["bench", "--registry", str(engine_registry.root), "--model", "llama", "--json"]
    argv += ["--device", "cpu"]  # the provider asserted below, also where a GPU is usable
    argv += ["--prompt-tokens", "16", "--new-tokens", "8", "--concurrency", "2", "--repeats", "2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"provider", "precision", "ttft_ms", "decode_tok_s", "aggregate_tok_s", "concurrency"}
    assert keys | {"prompt_tokens", "new_tokens", "peak_rss_mb"} <= set(report)
    assert (report["concurrency"], report["prompt_tokens"], report["new_tokens"]) == (2, 16, 8)
    assert report["provider"] == "cpu" and report["precision"] == "fp32"
    assert report["decode_tok_s"] > 0 and report["aggregate_tok_s"] > 0
    assert report["slots"] == 2  # one per stream unless --slots says otherwise


def test_bench_queues_beyond_its_slots_and_reports_every_request(engine_registry, capsys):
    """--concurrency 4 on --slots 1: four requests wait in one line, so the time to the first
    token spreads (p50 <= p99 <= max, the last one behind three whole replies); memory is
    accounted: the weights' files and the KV buffers of one slot."""
    argv = ["bench", "--registry", str(engine_registry.root), "--model", "llama", "--json"]
    argv += ["--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "16"]
    argv += ["--concurrency", "4", "--slots", "1", "--repeats", "1"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["concurrency"], report["slots"]) == (4, 1)
    assert report["ttft_p50_ms"] <= report["ttft_p99_ms"] == report["ttft_max_ms"]
    assert report["ttft_max_ms"] > report["ttft_p50_ms"]  # queued behind whole replies
    folder = engine_registry.root / "llama" / "v1"
    weights = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    assert report["weights_mb"] == round(weights / 2**20, 1) > 0
    config = json.loads((folder / "manifest.json").read_text())
    arch, graph = config["architecture"], config["graph"]
    layers, heads, dim = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"]
    kv = 2 * layers * heads * graph["max_context"] * dim * 4  # key and value, fp32, one slot
    assert report["kv_cache_mb"] == round(kv / 2**20, 1)


def test_percentile_is_the_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([7.0, 1.0], 50) == 1.0 and percentile([3.0], 99) == 3.0


def test_bench_on_cuda_never_reports_cpu_figures(engine_registry, capsys):
    """Asking for CUDA and getting the CPU is an error for a benchmark (fp32 never runs on CUDA,
    so this holds on a GPU machine too)."""
    argv = ["bench", "--registry", str(engine_registry.root), "--model", "llama", "--json"]
    argv += ["--device", "cuda", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1"]
    assert main(argv) != 0
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA was asked for but the CPU")
