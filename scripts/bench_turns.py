"""Time to first token over the turns of one conversation (the KV prefix kept between turns).

Usage: python scripts/bench_turns.py [--model REF] [--registry DIR]
Runs four user turns in one channel through the bot's ChatService (history, chat template, the
real engine) with a throwaway database; one JSON object per turn: prompt and cached tokens, TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.backends import LocalBackend
from bot.config import load_settings
from bot.engine import Engine
from bot.service import ChatService
from bot.storage.db import Database
from bot.turns import IncomingMessage, Speaker

TURNS = [
    "Hi! What's the capital of France?",
    "And which river runs through it?",
    "Name one famous museum there.",
    "Thanks! How tall is the Eiffel Tower?",
]


async def main(args: argparse.Namespace) -> None:
    overrides = {"model_registry": args.registry} if args.registry else {}
    settings = load_settings(**overrides)
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(f"sqlite+aiosqlite:///{tmp}/turns.db")
        engine = await Engine.start(args.model or settings.model, **settings.engine_options())
        try:
            service = ChatService(db, LocalBackend(engine), settings)
            user, bot = Speaker(1, "alice"), Speaker(2, "bot", is_bot=True)
            for turn, text in enumerate(TURNS, 1):
                async with service.reply(IncomingMessage(10, 20, user, text), bot=bot) as reply:
                    answer = "".join([piece async for piece in reply])
                r = reply.result
                assert r is not None
                record = {
                    "turn": turn,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "ttft_ms": round(r.ttft_ms, 1),
                    "reply": answer[:60],
                }
                print(json.dumps(record, ensure_ascii=False))
        finally:
            await engine.close()
            await db.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="NAME, NAME@N or a version folder (default: the active one)")
    ap.add_argument("--registry", help="registry folder (default: the bot's MODEL_REGISTRY)")
    asyncio.run(main(ap.parse_args()))
