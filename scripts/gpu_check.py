"""The whole GPU check of the engine in one command (issue 4, "The GPU"): correctness first, then
speed against transformers `generate` on the same GPU. Prints one JSON object per check on stdout;
the last line is the summary. Exit status 1 when a correctness check fails or CUDA was asked for
and the CPU ran instead (a silent fallback is not a GPU run).

  python scripts/gpu_check.py --out /tmp/gpucheck               # SmolLM2-135M shape, random weights
  python scripts/gpu_check.py --out /tmp/gpucheck --checkpoint DIR   # a real HF folder

Speed does not depend on the weight values, so without --checkpoint the model is a random-weight
checkpoint of SmolLM2-135M's shape, built here with transformers: nothing has to be carried to
the GPU machine but onnxruntime-gpu and pydantic (docs/performance.md, "Running the GPU check").
`--device cpu --tiny` runs the same steps on a tiny model on the CPU; the test suite does that.

Steps: export fp32 and fp16 (fused, verified against PyTorch as every export is); open the fp16
graph on the device as the engine does (exit 1 if the CPU would run it); teacher-forced logits of
fp16 on the device against fp32 on the CPU through the engine's runner (rows of different
lengths, a prompt longer than the prefill chunk, a reused prefix, decode steps as the engine runs
them, CUDA graphs included): max relative error < 1e-2 and top-1 agreement >= 0.98; the whole
engine's greedy tokens batched and alone; then `python -m bot bench` in fp16 with 1 and 64
streams, and transformers' eager `generate` in fp16 with the same prompts and token counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.engine import Engine, SamplingParams
from bot.engine.loader import load_model
from bot.engine.session import GraphRunner, create_session, preload_cuda_libraries
from export.pipeline import ExportRequest, export_checkpoint
from export.registry import Registry
from models.random_checkpoint import make_checkpoint

TARGETS = {  # issue 4 on an H100, fp16, prompt 128, 128 new tokens
    "one_stream_tok_s": 1000.0,
    "one_stream_vs_transformers": 5.0,
    "streams_64_aggregate_tok_s": 20000.0,
}


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def environment(device: str) -> dict:
    import onnxruntime as ort

    if device != "cpu":
        preload_cuda_libraries()
    record = {
        "check": "environment",
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "providers": ort.get_available_providers(),
    }
    try:
        import torch

        record["torch"] = torch.__version__
        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        record["torch"] = None
    return emit(record)


def export(checkpoint: Path, registry: Registry, max_context: int) -> dict[str, str]:
    refs = {}
    for precision in ("fp32", "fp16"):
        name = f"check-{precision}"
        t0 = time.perf_counter()
        info, _ = export_checkpoint(
            ExportRequest(
                checkpoint, name, precision=precision, max_context=max_context, progress=False
            ),
            registry,
        )
        refs[precision] = info.ref
        emit(
            {
                "check": "export",
                "precision": precision,
                "ref": info.ref,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return refs


THRESHOLDS = {"max_rel_error": 1e-2, "min_top1_agreement": 0.98}  # fp16 against fp32


def open_runner(ref: str, registry: Path, device: str, slots: int) -> GraphRunner:
    """The version's graph on `device`, opened exactly as the engine opens it (provider choice,
    precision rule, CUDA graphs)."""
    model = load_model(ref, registry)
    session, info = create_session(model.graph_path, device, precision=model.manifest.precision)
    return GraphRunner(session, info, slots)


def _drive(runner: GraphRunner, prompts: list[np.ndarray], chunk: int, steps: int, forced=None):
    """Run the engine's operations on `runner`; returns (logits observed, tokens fed).

    Each prompt prefills its own slot in chunks of `chunk` tokens (the engine's chunked
    prefill); then `steps` decode steps of every row at once; then slot 2 takes a new prompt
    that starts with what it holds (a reused prefix: only the rest is prefilled), and rows
    decode alone and in pairs (others ride along, as in the engine). Tokens are teacher-forced:
    `forced` when given, else this runner's argmax, so two runners see the same tokens.
    """
    forced = list(forced) if forced is not None else None
    fed, seen = [], []
    slots = len(prompts)
    held = [list(p) for p in prompts]

    def token(logits_rows: np.ndarray) -> np.ndarray:
        tokens = forced.pop(0) if forced is not None else logits_rows.argmax(-1)
        fed.append(np.asarray(tokens))
        return np.asarray(tokens)

    def prefill(slot: int, tokens: list[int], past: int) -> np.ndarray:
        for start in range(0, len(tokens), chunk):
            logits = runner.prefill(slot, np.asarray(tokens[start : start + chunk]), past + start)
        return logits

    def decode(first: int, n: int, nxt: np.ndarray) -> np.ndarray:
        lo, hi = runner.span(first, n)
        runner.ids[lo:hi, 0] = 0
        runner.seqlens[lo:hi] = [len(held[i]) if i < slots else 0 for i in range(lo, hi)]
        runner.ids[first : first + n, 0] = nxt
        for i, t in zip(range(first, first + n), nxt, strict=True):
            held[i].append(int(t))
        return runner.decode(first, n)[first : first + n].copy()

    last = np.stack([prefill(slot, list(p), 0) for slot, p in enumerate(prompts)])
    seen.append(last)
    for _ in range(steps):
        last = decode(0, slots, token(last))
        seen.append(last)
    latest = list(last)  # each row's newest logits
    keep = len(prompts[2]) + steps // 2  # inside what slot 2 holds: prompt and fed tokens
    reuse = held[2][:keep] + [int(t) % 97 + 3 for t in held[2][keep:]]
    held[2] = reuse
    latest[2] = prefill(2, reuse[keep:], keep)
    seen.append(latest[2][None])
    # rows alone and in pairs: with CUDA graphs every bucket (1, 2, 4) runs, others riding along
    ranges = [(2, 1), (0, 1), (1, 1), (0, 2), (1, 3)]
    for step in range(steps // 2):
        first, n = ranges[step % len(ranges)]
        out = decode(first, n, token(np.stack(latest[first : first + n])))
        latest[first : first + n] = list(out)
        seen.append(out)
    return seen, fed


def check_decode(runners: dict[str, GraphRunner], vocab: int, tiny: bool) -> dict:
    """Teacher-forced logits of fp16 on the device against fp32 on the CPU, through the engine's
    runner: rows of different lengths, a prompt longer than the prefill chunk, a reused prefix."""
    chunk, steps = (16, 8) if tiny else (256, 16)
    rng = np.random.default_rng(2)
    lengths = (5, 17, 40, chunk + chunk // 2 + 3)
    prompts = [rng.integers(3, vocab, n) for n in lengths]
    want, fed = _drive(runners["fp32"], prompts, chunk, steps)
    t0 = time.perf_counter()
    got, _ = _drive(runners["fp16"], prompts, chunk, steps, forced=fed)
    seconds = time.perf_counter() - t0
    errors, agree, count = [], 0, 0
    for w, g in zip(want, got, strict=True):
        g = g.astype(np.float64)
        errors.append(float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-12)))
        agree += int((g.argmax(-1) == w.argmax(-1)).sum())
        count += len(w)
    figures = {"max_rel_error": round(max(errors), 5), "top1_agreement": round(agree / count, 4)}
    return emit(
        {
            "check": "decode_logits",
            "provider": runners["fp16"].info.provider,
            "cuda_graphs": runners["fp16"].info.cuda_graphs,
            "prompt_lengths": list(lengths),
            "prefill_chunk": chunk,
            "reused_prefix": len(prompts[2]) + steps // 2,
            "compared_rows": count,
            **figures,
            "passed": figures["max_rel_error"] < THRESHOLDS["max_rel_error"]
            and figures["top1_agreement"] >= THRESHOLDS["min_top1_agreement"],
            "thresholds": THRESHOLDS,
            "seconds": round(seconds, 3),
        }
    )


async def _greedy(ref: str, registry: Path, device: str, prompts: list[list[int]], new: int):
    """Greedy tokens of every prompt through the engine, all at once and one at a time."""
    engine = await Engine.start(ref, registry=registry, device=device, slots=len(prompts))
    try:
        params = SamplingParams(greedy=True, max_new_tokens=new, ignore_eos=True)
        together = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
        alone = [await engine.generate(p, params) for p in prompts]
        return [r.token_ids for r in together], [r.token_ids for r in alone], engine.session_info
    finally:
        await engine.close()


def check_engine(ref: str, registry: Path, device: str, vocab: int, tiny: bool) -> dict:
    """The whole engine (scheduler, CUDA graphs, sampling) on the device: batched == alone."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 17, 40, 96)]
    new = 16 if tiny else 32
    together, alone, info = asyncio.run(_greedy(ref, registry, device, prompts, new))
    return emit(
        {
            "check": "engine_greedy",
            "provider": info.provider,
            "batched_equals_alone": together == alone,
            "prompts": len(prompts),
            "new_tokens": new,
        }
    )


def bench_ours(ref: str, registry: Path, device: str, streams: int, args) -> dict:
    """`python -m bot bench` in its own process (the command admins and the docs use)."""
    cmd = [
        sys.executable, "-m", "bot", "bench", "--model", ref, "--registry", str(registry),
        "--device", device, "--concurrency", str(streams), "--repeats", str(args.repeats),
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--json",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return emit({"check": "bench", "engine": "ours", "streams": streams, **report})


def bench_transformers(checkpoint: Path, device: str, streams: int, args) -> dict:
    """transformers `generate`, eager attention, fp16 on a GPU (fp32 on a CPU), greedy, EOS
    ignored (min_new_tokens); time to first token from a one-token generate."""
    import torch
    import transformers as tf

    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = tf.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="eager"
    )
    model = model.to(dev).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(
        3, vocab, (streams, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    ids, mask = ids.to(dev), torch.ones_like(ids).to(dev)

    def timed(n: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(4)  # warm-up
    runs = []
    for _ in range(args.repeats):
        first, whole = timed(1), timed(args.new_tokens)
        runs.append((first, whole))
    ttft = statistics.median(f for f, _ in runs)
    whole = statistics.median(w for _, w in runs)
    decode = (args.new_tokens - 1) / max(whole - ttft, 1e-9)
    return emit(
        {
            "check": "bench",
            "engine": "transformers",
            "device": dev,
            "dtype": str(dtype).removeprefix("torch."),
            "streams": streams,
            "ttft_ms": round(ttft * 1e3, 2),
            "decode_tok_s": round(decode, 2),
            "aggregate_tok_s": round(streams * args.new_tokens / whole, 2),
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (checkpoint, registry)")
    ap.add_argument("--checkpoint", type=Path, help="an HF folder (default: random weights)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (checks the script itself)")
    ap.add_argument("--streams", default="1,64", help="stream counts to bench, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-context", type=int, help="default: 2048 or the model's positions")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    environment(args.device)
    checkpoint = args.checkpoint
    if checkpoint is None:  # random weights, built once per --out folder
        kind = "llama" if args.tiny else "smollm2-135m"
        checkpoint = args.out / kind
        if not (checkpoint / "config.json").exists():
            make_checkpoint(checkpoint, kind)
    registry = Registry(args.out / "registry")
    refs = export(checkpoint, registry, args.max_context)
    vocab = load_model(refs["fp32"], registry.root).manifest.architecture.vocab_size
    runners = {
        "fp32": open_runner(refs["fp32"], registry.root, "cpu", slots=4),
        "fp16": open_runner(refs["fp16"], registry.root, args.device, slots=4),
    }
    info = runners["fp16"].info
    if args.device == "cuda" and info.provider != "cuda":  # no figures from the wrong device
        emit(
            {"check": "summary", "device": args.device, "provider": info.provider, "correct": False}
        )
        print(f"error: CUDA was asked for but the CPU ran: {info.fallback_reason}", file=sys.stderr)
        return 1
    decode = check_decode(runners, vocab, args.tiny)
    for runner in runners.values():
        runner.release()
    engine = check_engine(refs["fp16"], registry.root, args.device, vocab, args.tiny)

    streams = [int(s) for s in args.streams.split(",")]
    ours = {n: bench_ours(refs["fp16"], registry.root, args.device, n, args) for n in streams}
    theirs = {n: bench_transformers(checkpoint, args.device, n, args) for n in streams}

    correct = (
        all(r["provider"] == info.provider for r in ours.values())  # no fallback mid-way
        and engine["provider"] == info.provider
        and decode["passed"]
    )
    one, many = min(streams), max(streams)
    figures = {
        "one_stream_tok_s": ours[one]["decode_tok_s"],
        "one_stream_vs_transformers": round(
            ours[one]["decode_tok_s"] / theirs[one]["decode_tok_s"], 2
        ),
        f"streams_{many}_aggregate_tok_s": ours[many]["aggregate_tok_s"],
    }
    emit(
        {
            "check": "summary",
            "device": args.device,
            "provider": info.provider,
            "correct": correct,
            "engine_batched_equals_alone": engine["batched_equals_alone"],
            **figures,
            "targets_met": {k: figures[k] >= v for k, v in TARGETS.items() if k in figures},
        }
    )
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
