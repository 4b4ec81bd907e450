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

Steps: export fp32 and fp16 (fused, verified against PyTorch as every export is); greedy tokens
of the fp32 graph on the device equal the CPU's, batched and alone; the fp16 graph's logits close
to fp32's; then `python -m bot bench` in fp16 with 1 and 64 streams, and transformers' eager
`generate` in fp16 with the same prompts and token counts.
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


async def _greedy(ref: str, registry: Path, device: str, prompts: list[list[int]], new: int):
    """Greedy tokens of every prompt, all at once and one at a time; and which provider ran."""
    engine = await Engine.start(ref, registry=registry, device=device, slots=len(prompts))
    try:
        params = SamplingParams(greedy=True, max_new_tokens=new, ignore_eos=True)
        together = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
        alone = [await engine.generate(p, params) for p in prompts]
        info = engine.session_info
        return [r.token_ids for r in together], [r.token_ids for r in alone], info
    finally:
        await engine.close()


def check_greedy(refs: dict[str, str], registry: Path, device: str, vocab: int, tiny: bool) -> dict:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 17, 40, 96)]
    new = 16 if tiny else 32
    cpu_together, cpu_alone, _ = asyncio.run(_greedy(refs["fp32"], registry, "cpu", prompts, new))
    together, alone, info = asyncio.run(_greedy(refs["fp32"], registry, device, prompts, new))
    return emit(
        {
            "check": "greedy_fp32",
            "provider": info.provider,
            "fallback_reason": info.fallback_reason,
            "device_batched_equals_alone": together == alone,
            "device_equals_cpu": alone == cpu_alone,
            "cpu_batched_equals_alone": cpu_together == cpu_alone,
            "prompts": len(prompts),
            "new_tokens": new,
        }
    )


def check_fp16_logits(refs: dict[str, str], registry: Path, device: str, vocab: int) -> dict:
    """Last-position logits of fp16 on the device against fp32 on the CPU, over a few prompts."""
    runners = {}
    for precision, dev in (("fp32", "cpu"), ("fp16", device)):
        model = load_model(refs[precision], registry)
        session, info = create_session(model.graph_path, dev)
        runners[precision] = GraphRunner(session, info, slots=1)
    rng = np.random.default_rng(2)
    errors, agree = [], []
    for n in (8, 33, 100):
        prompt = rng.integers(3, vocab, n)
        full = runners["fp32"].prefill(0, prompt, 0).copy()
        half = runners["fp16"].prefill(0, prompt, 0).astype(np.float32)
        errors.append(float(np.abs(full - half).max() / (np.abs(full).max() + 1e-9)))
        agree.append(bool(full.argmax() == half.argmax()))
    return emit(
        {
            "check": "fp16_logits",
            "provider": runners["fp16"].info.provider,
            "max_rel_error": round(max(errors), 5),
            "top1_agreement": sum(agree) / len(agree),
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
    greedy = check_greedy(refs, registry.root, args.device, vocab, args.tiny)
    if args.device == "cuda" and greedy["provider"] != "cuda":
        emit(
            {
                "check": "summary",
                "device": args.device,
                "provider": greedy["provider"],
                "correct": False,
            }
        )
        print(
            f"error: CUDA was asked for but the CPU ran: {greedy['fallback_reason']}",
            file=sys.stderr,
        )
        return 1
    logits = check_fp16_logits(refs, registry.root, args.device, vocab)

    streams = [int(s) for s in args.streams.split(",")]
    ours = {n: bench_ours(refs["fp16"], registry.root, args.device, n, args) for n in streams}
    theirs = {n: bench_transformers(checkpoint, args.device, n, args) for n in streams}

    correct = (
        all(r["provider"] == greedy["provider"] for r in ours.values())  # no fallback mid-way
        and greedy["device_equals_cpu"]
        and greedy["device_batched_equals_alone"]
        and greedy["cpu_batched_equals_alone"]
        and logits["top1_agreement"] >= 2 / 3
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
            "provider": greedy["provider"],
            "correct": correct,
            **figures,
            "targets_met": {k: figures[k] >= v for k, v in TARGETS.items() if k in figures},
        }
    )
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
