"""`python -m models eval`: validation perplexity, BLEU and ROUGE-L of greedy replies, samples."""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.data import IGNORE, VAL_FRACTION, Conversation, Example, collate, pad_id_of

if TYPE_CHECKING:
    from models.model import CausalLM
    from models.tokenizer import TokenizerBundle

N_SAMPLES = 3  # sample replies shown in the report


# -----------------------------------------------------------------------------
# loss and perplexity


def token_loss(model: CausalLM, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    The output head (the largest matmul of a small model) runs only on the labelled positions.
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    hidden, _ = model.hidden(input_ids, positions)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA cards that have it, fp16 on older ones, full fp32 on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def mean_loss(model: CausalLM, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss over the labelled tokens of `examples` (eval mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # similar lengths together: less padding
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), batch_size):
        ids, labels = collate(ordered[i : i + batch_size], pad_id)
        with autocast_for(device):
            loss, n = token_loss(model, ids.to(device), labels.to(device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


# -----------------------------------------------------------------------------
# greedy replies


def stop_ids(model: CausalLM, tokenizer: TokenizerBundle, generation: dict[str, Any]) -> set[int]:
    """Token ids that end a reply: the config's and generation config's eos, the tokenizer's."""
    ids: set[int] = set()
    for value in (model.config.eos_token_id, generation.get("eos_token_id")):
        ids |= set(value) if isinstance(value, list) else {value} if value is not None else set()
    eos = tokenizer.token_id(tokenizer.eos_token)
    return ids | ({eos} if eos is not None else set())


@torch.no_grad()
def greedy_reply(
    model: CausalLM, prompt_ids: list[int], stops: set[int], max_new_tokens: int
) -> list[int]:
    """Greedy decoding with the model's KV cache: prefill the prompt, then one token per step."""
    device = next(model.parameters()).device
    room = model.config.max_position_embeddings - max_new_tokens
    prompt_ids = prompt_ids[-max(room, 1) :]  # keep the end of an over-long prompt
    logits, past = model(torch.tensor([prompt_ids], device=device))
    reply: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        reply.append(token)
        if len(prompt_ids) + len(reply) >= model.config.max_position_embeddings:
            break
        logits, past = model(torch.tensor([[token]], device=device), past_key_values=past)
    return reply


def reply_pairs(conversations: list[Conversation]) -> list[tuple[Conversation, str]]:
    """(the conversation up to its first assistant turn, that turn's text) per conversation."""
    pairs = []
    for messages in conversations:
        k = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0), None)
        if k is not None:
            pairs.append((messages[:k], messages[k]["content"]))
    return pairs


def text_metrics(replies: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-L F-measure (rouge-score, 0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(replies, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        scorer.score(ref, hyp)["rougeL"].fmeasure
        for ref, hyp in zip(references, replies, strict=True)
    ]
    return {"bleu": bleu, "rouge_l": sum(rouge) / max(len(rouge), 1)}


# -----------------------------------------------------------------------------
# the command


def evaluate(
    model_dir: str,
    spec: str,
    *,
    limit: int,
    replies: int,
    max_new_tokens: int,
    max_length: int,
    split: str,
    val_fraction: float = VAL_FRACTION,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity on the chosen split's labelled tokens; BLEU/ROUGE-L and samples of greedy
    replies to its first `replies` conversations (dialogue only)."""
    from models.checkpoint import load_checkpoint
    from models.data import encode_items, load_dataset, split_items
    from models.errors import ModelError
    from models.model import CausalLM

    dataset = load_dataset(spec)
    checkpoint = load_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer
    items = dataset.items if split == "all" else split_items(dataset.items, val_fraction)[1]
    items = items[:limit]
    examples = encode_items(tokenizer, items, max_length, dataset.is_dialogue)
    if not examples:
        raise ModelError(f"{spec}: no examples with a labelled token in the {split} split")
    model = CausalLM.from_checkpoint(checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    loss = mean_loss(model, examples, pad_id_of(tokenizer), batch_size)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "data": spec,
        "split": split,
        "conversations": len(items),
        "tokens": sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples),
        "loss": loss,
        "perplexity": perplexity(loss),
        "bleu": None,
        "rouge_l": None,
        "samples": [],
    }
    if not dataset.is_dialogue or replies <= 0:
        return result
    stops = stop_ids(model, tokenizer, checkpoint.generation_config)
    pairs = reply_pairs(items)[:replies]
    outputs = []
    for prompt, _ in pairs:
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt))
        reply = greedy_reply(model, prompt_ids, stops, max_new_tokens)
        outputs.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
    references = [ref for _, ref in pairs]
    result |= text_metrics(outputs, references) | {"replies": len(pairs)}
    result["samples"] = [
        {"prompt": prompt[-1]["content"], "reference": ref, "reply": out}
        for (prompt, ref), out in list(zip(pairs, outputs, strict=True))[:N_SAMPLES]
    ]
    return result


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="HF folder (or .gguf file)")
    parser.add_argument("--data", required=True, help="chitchat, chatterbot:LANG, .jsonl or text")
    parser.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="the held-out validation part (as fine-tuning splits it) or every conversation",
    )
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--limit", type=int, default=200, help="at most N conversations")
    parser.add_argument("--replies", type=int, default=16, help="greedy replies for BLEU/ROUGE")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per conversation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")


def eval_main(args: argparse.Namespace) -> int:
    result = evaluate(
        args.model_dir,
        args.data,
        limit=args.limit,
        replies=args.replies,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        split=args.split,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"{result['data']} ({result['split']}, {result['conversations']} conversations)")
    print(f"  perplexity {result['perplexity']:.3f} over {result['tokens']} tokens")
    if result["bleu"] is not None:
        print(f"  BLEU {result['bleu']:.2f}  ROUGE-L {result['rouge_l']:.4f}")
    for sample in result["samples"]:
        print(f"  > {sample['prompt']}\n    ref: {sample['reference']}\n    got: {sample['reply']}")
    sys.stdout.flush()
    return 0
