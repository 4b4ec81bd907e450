"""Peak memory of one export: a random Llama checkpoint of a real model's shape, exported by
`python -m export` in a child process; prints JSON {params, checkpoint_bytes, peak_rss_bytes,
ratio, seconds}.

    python scripts/bench_export_memory.py --shape 1b [--dtype float32|bfloat16] [--keep DIR]

The checkpoint is written tensor by tensor with safetensors (never a whole model in memory) into
a temporary folder under /tmp with a byte-level BPE tokenizer (no chat template, so the export's
quality gate, which measures answers and not memory, is skipped), then exported at fp32 with the
default fused flavour (or --precision), verification included (--force: published even when
a quantized precision misses the parity bars on random weights). peak_rss_bytes: the
child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.random_checkpoint import write_tokenizer

# Llama 3.2 1B and 3B (default RoPE, tied head): the sizes people fine-tune
SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256),
}
SHARD_BYTES = 2 * 10**9


def tensor_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a tied Llama of shape `s`."""
    head_dim = s["hidden"] // s["heads"]
    shapes = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (s["hidden"],),
            p + "self_attn.q_proj.weight": (s["heads"] * head_dim, s["hidden"]),
            p + "self_attn.k_proj.weight": (s["kv_heads"] * head_dim, s["hidden"]),
            p + "self_attn.v_proj.weight": (s["kv_heads"] * head_dim, s["hidden"]),
            p + "self_attn.o_proj.weight": (s["hidden"], s["heads"] * head_dim),
            p + "post_attention_layernorm.weight": (s["hidden"],),
            p + "mlp.gate_proj.weight": (s["intermediate"], s["hidden"]),
            p + "mlp.up_proj.weight": (s["intermediate"], s["hidden"]),
            p + "mlp.down_proj.weight": (s["hidden"], s["intermediate"]),
        }
    return shapes | {"model.norm.weight": (s["hidden"],)}


def write_checkpoint(out: Path, shape: str, dtype: torch.dtype) -> tuple[int, int]:
    """A random checkpoint in `out` (sharded as transformers shards); (params, weight bytes)."""
    s = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, str] = {}
    params = total = size = 0
    names = list(tensor_shapes(s).items())

    def flush() -> None:
        index = len(weight_map_files) + 1
        file = f"model-{index:05d}.safetensors"
        save_file(shards[-1], str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], file))
        weight_map_files.append(file)
        shards[-1] = {}

    weight_map_files: list[str] = []
    for name, dims in names:
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=dtype)
        else:
            t = (torch.randn(dims, generator=generator) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = t
        size += nbytes
        params += t.numel()
        total += nbytes
    flush()
    head_dim = s["hidden"] // s["heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    write_tokenizer(out, vocab_size=min(s["vocab"], 1000))
    config_file = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("chat_template")
    config_file.write_text(json.dumps(tokenizer_config))
    return params, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--precision", default="fp32", help="export precision")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir="/tmp") as tmp:
        root = args.keep or Path(tmp)
        checkpoint = root / f"llama-{args.shape}-{args.dtype}"
        print(f"writing {checkpoint}", file=sys.stderr)
        params, nbytes = write_checkpoint(checkpoint, args.shape, getattr(torch, args.dtype))
        command = [
            sys.executable,
            "-m",
            "export",
            str(checkpoint),
            "--name",
            "bench",
            "--precision",
            args.precision,
            "--registry",
            str(root / "registry"),
            "--json",
            # memory is measured, not accuracy: random weights give flat distributions on which
            # quantized precisions miss the parity bars (the figures are still reported)
            "--force",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"export failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        exported = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "shape": args.shape,
                "dtype": args.dtype,
                "precision": args.precision,
                "params": params,
                "checkpoint_bytes": nbytes,
                "peak_rss_bytes": peak,
                "ratio": round(peak / nbytes, 3),
                "seconds": round(seconds, 1),
                "parity_max_rel_error": exported.get("parity", {}).get("max_rel_error"),
            }
        )
    )


if __name__ == "__main__":
    main()
