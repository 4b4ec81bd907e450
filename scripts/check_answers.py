"""Ask a version a dozen factual questions and count the answers that name the right thing.

Usage: python scripts/check_answers.py --models s-fp32,s-int8 [--registry DIR]
           [--temperatures 0.7,0.2] [--seeds 4]
Prints one JSON object per (model, temperature): how many of the sampled answers contain the
expected keyword. A coarse check of what quantization and sampling settings do to answers, which
the export's parity figures (logit error, top-1 agreement on random prompts) do not show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.engine import Engine, SamplingParams

QUESTIONS = {
    "What is the capital of France?": "paris",
    "What is 2 + 2?": "4",
    "Who wrote Romeo and Juliet?": "shakespeare",
    "What color is the sky?": "blue",
    "How many days are in a week?": "7",
    "What is the largest planet in the solar system?": "jupiter",
    "Translate 'hello' into Spanish.": "hola",
    "What is water made of?": "hydrogen",
    "What is the boiling point of water in Celsius?": "100",
    "Who painted the Mona Lisa?": "leonardo",
    "What is the capital of Japan?": "tokyo",
    "What language is spoken in Brazil?": "portuguese",
}


async def score(model: str, registry: Path | None, temperature: float, seeds: int) -> dict:
    engine = await Engine.start(model, registry=registry, slots=4)
    try:
        loaded, right, wrong = engine.model, 0, []
        for question, keyword in QUESTIONS.items():
            ids = loaded.encode_chat(question)
            for seed in range(seeds):
                params = SamplingParams(
                    temperature=temperature, top_p=0.9, top_k=50, seed=seed, max_new_tokens=40
                )
                answer = (await engine.generate(ids, params)).text
                if keyword in answer.lower():
                    right += 1
                else:
                    wrong.append(answer[:80])
        total = len(QUESTIONS) * seeds
        return {"model": loaded.ref, "temperature": temperature, "right": right, "of": total,
                "some_wrong": wrong[:3]}  # fmt: skip
    finally:
        await engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated NAME, NAME@N or folders")
    ap.add_argument("--registry", type=Path)
    ap.add_argument("--temperatures", default="0.7,0.2")
    ap.add_argument("--seeds", type=int, default=4, help="samples per question")
    args = ap.parse_args()
    for model in args.models.split(","):
        for t in map(float, args.temperatures.split(",")):
            print(json.dumps(asyncio.run(score(model, args.registry, t, args.seeds))), flush=True)


if __name__ == "__main__":
    main()
