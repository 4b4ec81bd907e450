"""`python -m bot generate`: generate text with a model version from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bot.engine.engine import Engine
from bot.engine.loader import LoadedModel
from bot.engine.session import DEVICES
from bot.engine.types import EngineError, GenerationResult, QueueFullError, SamplingParams
from bot.generation import SETTINGS, version_params


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --registry, --device, --threads (shared with `bench`)."""
    parser.add_argument(
        "--model", default=None, help="NAME, NAME@N or a version folder (default: the active one)"
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="registry folder (default: $MODEL_REGISTRY or data/registry)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument(
        "--spin", action="store_true", help="let idle ORT threads spin (dedicated machines)"
    )


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text")
    src.add_argument("--chat", help="one user turn, rendered with the chat template")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument(
        "--prompt-ids-file",
        type=Path,
        help='.jsonl: one {"prompt_ids": [...]} or {"prompt": "..."} per line, run batched',
    )
    s = parser.add_argument_group("sampling (default: the version's, as the bot samples it)")
    s.add_argument("--greedy", action="store_true", help="argmax decoding")
    for setting in SETTINGS.values():  # the bot's generation settings, with their ranges
        flag = "--" + setting.name.replace("_", "-")
        s.add_argument(flag, type=setting.kind, help=setting.describe())
    s.add_argument("--min-p", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--min-new-tokens", type=int)
    s.add_argument("--ignore-eos", action="store_true", help="do not stop on stop tokens")
    parser.add_argument("--slots", type=int, default=8, help="concurrent sequences")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")


def _prompts(args: argparse.Namespace, engine: Engine) -> list[list[int]]:
    model = engine.model
    if args.prompt is not None:
        return [model.encode(args.prompt, add_special_tokens=True)]
    if args.chat is not None:
        return [model.encode_chat(args.chat)]
    if args.prompt_ids is not None:
        try:
            return [[int(x) for x in args.prompt_ids.split(",") if x.strip()]]
        except ValueError:
            raise ValueError(
                f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}"
            ) from None
    prompts = []
    try:
        lines = args.prompt_ids_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{args.prompt_ids_file}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if "prompt_ids" in item:
                prompts.append([int(x) for x in item["prompt_ids"]])
            else:
                prompts.append(model.encode(str(item["prompt"]), add_special_tokens=True))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            expected = '{"prompt_ids": [...]} or {"prompt": "..."}'
            raise ValueError(f"{args.prompt_ids_file}:{n}: expected {expected}") from None
    if not prompts:
        raise ValueError(f"{args.prompt_ids_file}: no prompts")
    return prompts


def sampling_from_args(args: argparse.Namespace, model: LoadedModel) -> SamplingParams:
    """The version's defaults as the bot samples them, overridden by the flags given."""
    return version_params(
        model,
        **{name: getattr(args, name) for name in SETTINGS},
        greedy=True if args.greedy else None,
        min_p=args.min_p,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        stop=tuple(args.stop) if args.stop else None,
        min_new_tokens=args.min_new_tokens,
        ignore_eos=True if args.ignore_eos else None,
    )


def _record(index: int, result: GenerationResult) -> dict[str, Any]:
    return {
        "index": index,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "completion_tokens": result.completion_tokens,
        **result.timings(),
        "model": result.model,
    }


async def _generate(args: argparse.Namespace) -> int:
    engine = await Engine.start(
        args.model,
        registry=args.registry,
        device=args.device,
        slots=args.slots,
        max_queue=64,
        threads=args.threads,
        spin=args.spin,
    )
    try:
        info = engine.session_info
        print(
            f"model {engine.model.ref} ({engine.precision}) on {info.provider}"
            + (f", {info.threads} threads" if info.threads else ""),
            file=sys.stderr,
        )
        prompts = _prompts(args, engine)
        params = sampling_from_args(args, engine.model)
        streams = []
        for p in prompts:  # all at once: they run batched
            while True:
                try:
                    streams.append(engine.submit(p, params, timeout_s=args.timeout))
                    break
                except QueueFullError:  # more prompts than the queue holds: wait for room
                    await asyncio.sleep(0.01)
        if len(streams) == 1 and not args.json:
            async for piece in streams[0]:
                print(piece, end="", flush=True)
            print()
            result = await streams[0].wait()
            print(f"[{result.finish_reason}]", file=sys.stderr)
            return 0
        results = await asyncio.gather(*(s.collect() for s in streams))
        for i, result in enumerate(results):
            if args.json:
                print(json.dumps(_record(i, result), ensure_ascii=False))
            else:
                print(f"--- {i} [{result.finish_reason}]\n{result.text}")
        return 0
    finally:
        await engine.close()


def generate_main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_generate(args))
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
