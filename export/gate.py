"""The quality gate: greedy answers of a graph to fixed chat prompts, token for token vs fp32."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Factual questions and small talk, each rendered as one user turn with the model's chat template.
# The first is README's example; its answer must name EXAMPLE_EXPECTED.
PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What language is spoken in Brazil?",
    "What is 2 + 2?",
    "Translate 'hello' into Spanish.",
    "What is water made of?",
    "Name three primary colors.",
    "What is photosynthesis?",
    "Hi! How are you today?",
    "Good morning! Any plans for the weekend?",
    "Can you recommend a good book?",
    "Tell me a joke.",
    "What's your favorite food?",
    "I'm feeling a bit tired today.",
    "Thanks for your help!",
    "What should I cook for dinner tonight?",
    "Do you like music?",
    "Can you give me a tip for learning to code?",
)
EXAMPLE_PROMPT = PROMPTS[0]
EXAMPLE_EXPECTED = "Paris"
NEW_TOKENS = 24
# answers that must equal the fp32 graph's, of len(PROMPTS) (fp32 is the reference itself)
MIN_EQUAL: dict[str, int] = {"fp32": 24, "fp16": 22, "int8": 22, "int4": 20}
KV_BUDGET_BYTES = 512 << 20  # rows per batch are chosen so the KV buffers stay under this


class DoesNotFit(ValueError):
    """The gate's prompts and answers need more positions than the graph's max_context."""


@dataclass(frozen=True)
class Prompts:
    """The gate's prompts as token ids, and the ids that end an answer."""

    ids: list[list[int]]
    stop_ids: frozenset[int]


def render_prompts(tokenizer: Any, stop_ids: list[int]) -> Prompts | None:
    """PROMPTS through a models.tokenizer.TokenizerBundle's chat template (None: no template)."""
    if tokenizer is None or not tokenizer.chat_template:
        return None
    ids = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]))
        for p in PROMPTS
    ]
    return Prompts(ids=ids, stop_ids=frozenset(stop_ids))


def greedy_answers(graph: str | Path, prompts: Prompts, new_tokens: int = NEW_TOKENS) -> list:
    """Greedy continuations of every prompt through a fused graph (ORT, CPU), each cut after its
    first stop token. Prompts run in right-padded batches, as the engine's first prefill does."""
    from export.runner import PAST, FusedRunner, cpu_session

    session = cpu_session(Path(graph))
    kv = [i for i in session.get_inputs() if i.name.startswith(PAST)]
    _, kv_heads, max_context, head_dim = kv[0].shape
    longest = max(len(p) for p in prompts.ids)
    if longest + new_tokens > max_context:
        raise DoesNotFit(
            f"the gate's prompts need {longest + new_tokens} positions, the graph {max_context}"
        )
    itemsize = 2 if kv[0].type == "tensor(float16)" else 4
    row_bytes = len(kv) * kv_heads * max_context * head_dim * itemsize
    rows = max(1, min(len(prompts.ids), KV_BUDGET_BYTES // row_bytes))
    runner = FusedRunner(session, rows)
    answers: list[list[int]] = []
    for start in range(0, len(prompts.ids), rows):
        batch = prompts.ids[start : start + rows]
        answers += _greedy_batch(runner, batch, new_tokens)
    return [_cut(a, prompts.stop_ids) for a in answers]


def _greedy_batch(runner: Any, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    n, width = len(batch), max(len(p) for p in batch)
    ids = np.zeros((n, width), np.int64)
    for r, p in enumerate(batch):
        ids[r, : len(p)] = p
    lengths = np.array([len(p) for p in batch])
    tokens = runner.run(0, ids, past=np.zeros(n, np.int64), counts=lengths).argmax(-1)
    out = [[int(t)] for t in tokens]
    for _ in range(new_tokens - 1):
        runner.ids[:n, 0] = tokens
        runner.seqlens[:n] = lengths  # the cached length: the new token's index
        tokens = runner.decode(0, n)[:n].argmax(-1)
        lengths = lengths + 1
        for r, t in enumerate(tokens):
            out[r].append(int(t))
    return out


def _cut(tokens: list[int], stop_ids: frozenset[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def reference_answers(src: Any, prompts: Prompts, new_tokens: int = NEW_TOKENS) -> list:
    """The fp32 fused graph's greedy answers, built in a temporary folder just long enough."""
    from export.graph_fused import build_fused_graph
    from export.onnx_graph import save_model

    longest = max(len(p) for p in prompts.ids)
    context = min(-(-(longest + new_tokens) // 64) * 64, src.config.max_position_embeddings)
    with tempfile.TemporaryDirectory(prefix="gate-fp32-") as tmp:
        path = save_model(
            build_fused_graph(src, precision="fp32", max_context=context), Path(tmp) / "model.onnx"
        )
        return greedy_answers(path, prompts, new_tokens)


def evaluate(
    answers: list[list[int]],
    reference: list[list[int]],
    precision: str,
    decode: Any,
    seconds: float,
) -> dict[str, Any]:
    """The gate's figures (export.manifest.Gate fields) from answers and the fp32 answers."""
    differing = [i for i, (a, b) in enumerate(zip(answers, reference, strict=True)) if a != b]
    example = decode(answers[PROMPTS.index(EXAMPLE_PROMPT)])
    example_correct = EXAMPLE_EXPECTED.lower() in example.lower()
    equal = len(answers) - len(differing)
    min_equal = MIN_EQUAL[precision]
    return {
        "passed": bool(equal >= min_equal and example_correct),
        "prompts": len(answers),
        "new_tokens": NEW_TOKENS,
        "answers_equal": equal,
        "min_equal": min_equal,
        "differing": differing,
        "example_prompt": EXAMPLE_PROMPT,
        "example_expected": EXAMPLE_EXPECTED,
        "example_answer": example,
        "example_correct": bool(example_correct),
        "seconds": round(seconds, 3),
    }


_REFERENCE_CACHE: dict[tuple, list] = {}


def run_gate(graph: str | Path, src: Any, precision: str, stop_ids: list[int]) -> dict | None:
    """Gate figures for the graph of `src` at `precision`; None when the model has no chat
    template (nothing to render the prompts with) or the graph's max_context is too short for
    them. fp32 answers are cached per source files."""
    started = time.perf_counter()
    prompts = render_prompts(src.tokenizer, stop_ids)
    if prompts is None:
        return None
    try:
        answers = greedy_answers(graph, prompts)
    except DoesNotFit:
        return None
    if precision == "fp32":
        reference = answers
    else:
        key = (
            tuple((str(f.path), f.sha256) for f in src.source_files),
            tuple(map(tuple, prompts.ids)),
        )
        if key not in _REFERENCE_CACHE:
            _REFERENCE_CACHE.clear()
            _REFERENCE_CACHE[key] = reference_answers(src, prompts)
        reference = _REFERENCE_CACHE[key]
    return evaluate(
        answers, reference, precision, src.tokenizer.decode, time.perf_counter() - started
    )
