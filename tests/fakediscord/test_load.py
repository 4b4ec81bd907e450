"""The load benchmark through the fake Discord runs and reports every mention (no timings
asserted: speed lives in the benchmark's output)."""

from __future__ import annotations

import argparse

from tests.fakediscord.load import main, run


async def test_the_load_benchmark_answers_every_mention_and_reports_its_times(tiny_registry):
    args = argparse.Namespace(
        registry=tiny_registry.root,
        model="tiny",
        members=4,
        channels=2,
        slots=2,
        threads=1,
        max_tokens=8,
        placeholder_after_s=0.0,
        timeout=120,
    )
    report = await run(args)
    assert (report["members"], report["channels"], report["slots"]) == (4, 2, 2)
    for key in ("first_post_ms", "first_text_ms"):
        figures = report[key]
        assert 0 <= figures["p50"] <= figures["p99"] <= figures["max"]
    # without a placeholder the first post is the answer's first text
    assert report["first_post_ms"] == report["first_text_ms"]
    assert report["all_done_s"] * 1000 >= report["first_text_ms"]["max"] - 50  # (rounded to 0.1 s)


def test_an_unknown_model_is_a_one_line_error(tiny_registry, capsys):
    argv = ["--registry", str(tiny_registry.root), "--model", "nope", "--members", "1"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"error: no model named 'nope' in {tiny_registry.root} (models: tiny)"
    ]
