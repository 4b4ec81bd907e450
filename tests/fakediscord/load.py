"""Latency under load as members feel it: N members mention the bot at once in M channels of
the fake Discord; the time from each mention to the bot's first post (the answer or its "in line"
placeholder), to the answer's first text and to the complete answer.

Usage: python -m tests.fakediscord.load --registry DIR --model REF [--members 16]
           [--channels 8] [--slots 8] [--max-tokens 64] [--placeholder-after-s 2.0]
Prints one JSON object (milliseconds, p50/p99/max over the mentions). A benchmark, not a test:
run it on a quiet machine and compare figures from one sitting only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from asyncio import FIRST_COMPLETED
from pathlib import Path
from typing import Any

from bot.client import create_bot
from bot.cogs.chat import IN_LINE
from bot.config import BotConfig
from bot.engine import EngineError
from bot.engine.bench import percentile
from tests.fakediscord import FakeDiscord


def _figures(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 50)),
        "p99": round(percentile(ms, 99)),
        "max": round(max(ms)),
    }


def _reference(body: Any) -> str:
    return str(((body or {}).get("message_reference") or {}).get("message_id"))


def _times(fake: FakeDiscord, mention: dict[str, Any]) -> tuple[float, float] | None:
    """(first post, first text) of the bot's answer to `mention`, in time.monotonic()."""
    posts = [r for r in fake.requests if r.method == "POST" and _reference(r.json) == mention["id"]]
    if not posts:
        return None
    if posts[0].json.get("content") != IN_LINE:
        return posts[0].at, posts[0].at
    held = next(
        (
            m
            for m in fake.messages.values()
            if m["author"]["id"] == fake.bot_user["id"] and _reference(m) == mention["id"]
        ),
        None,
    )
    if held is None:
        return None
    edits = [
        r
        for r in fake.requests
        if r.method == "PATCH"
        and r.path.endswith(f"/messages/{held['id']}")
        and (r.json or {}).get("content") not in (None, IN_LINE)
    ]
    return (posts[0].at, edits[0].at) if edits else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with FakeDiscord(n_channels=args.channels) as fake:
            settings = BotConfig(
                _env_file=None,
                discord_api_base=fake.api_base,
                discord_gateway_url=fake.gateway_url,
                data_dir=Path(tmp),
                database_url=f"sqlite+aiosqlite:///{tmp}/bot.db",
                model_registry=args.registry,
                model=args.model,
                command_guild_ids=[fake.guild_id],
                engine_slots=args.slots,
                engine_threads=args.threads,
                user_rate_per_min=0,
                channel_rate_per_min=0,
                placeholder_after_s=args.placeholder_after_s,
            )
            bot = await create_bot(settings)
            task = asyncio.create_task(bot.start("fake-token"))
            try:
                ready = asyncio.create_task(bot.wait_until_ready())
                await asyncio.wait({task, ready}, timeout=120, return_when=FIRST_COMPLETED)
                if task.done():  # it could not start (a wrong model): its error, at once
                    ready.cancel()
                    task.result()
                if not ready.done():
                    raise TimeoutError("the bot did not connect to the fake Discord in 120 s")
                return await _load(fake, bot, args)
            finally:
                await bot.close()
                await asyncio.wait_for(task, 60)


async def _load(fake: FakeDiscord, bot: Any, args: argparse.Namespace) -> dict[str, Any]:
    channels = fake.text_channel_ids[: args.channels]
    for channel in channels:
        await bot.chat.update_settings(channel, fake.guild_id, max_tokens=args.max_tokens)
    members = [fake.add_user(f"member{i}") for i in range(args.members)]
    mention = f"<@{fake.bot_user['id']}>"
    sent: list[tuple[dict[str, Any], float]] = []
    for i, member in enumerate(members):  # as fast as the gateway delivers them
        channel = channels[i % len(channels)]
        text = f"{mention} hi, I am member {i}: tell me about the sea in two sentences."
        message = await fake.dispatch_message(channel, member, text, [fake.bot_user])
        sent.append((message, time.monotonic()))

    def answered() -> bool:
        return all(_times(fake, m) is not None for m, _ in sent)

    await fake.wait_until(answered, args.timeout)
    await fake.wait_until(lambda: bot.active_replies == 0, args.timeout)
    end = time.monotonic()
    times = [(_times(fake, m), t0) for m, t0 in sent]
    return {
        "model": args.model,
        "members": args.members,
        "channels": args.channels,
        "slots": args.slots,
        "max_tokens": args.max_tokens,
        "placeholder_after_s": args.placeholder_after_s,
        "first_post_ms": _figures([t[0] - t0 for t, t0 in times if t]),
        "first_text_ms": _figures([t[1] - t0 for t, t0 in times if t]),
        "all_done_s": round(end - min(t0 for _, t0 in sent), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the cores)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--placeholder-after-s", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except (EngineError, ValueError, TimeoutError) as exc:  # a wrong model, a stuck bot
        print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
