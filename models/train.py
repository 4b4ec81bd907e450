"""`python -m models train|finetune`: one training loop (AdamW, warmup+cosine, early stop, LoRA)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from models.data import (
    VAL_FRACTION,
    Dataset,
    Example,
    TrainBatches,
    collate,
    encode_items,
    pad_id_of,
)
from models.errors import ModelError, first_line
from models.evaluate import autocast_for, mean_loss, perplexity, token_loss

if TYPE_CHECKING:
    from models.model import CausalLM, ModelConfig
    from models.tokenizer import TokenizerBundle

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STATE_FILE, BEST_FILE = "state.pt", "best.pt"


# -----------------------------------------------------------------------------
# learning-rate schedule


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# LoRA


class LoRA(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + s * x A^T B^T.

    Works for nn.Linear (weight [out, in]) and GPT-2's Conv1D (weight [in, out]); B starts at
    zero, so the wrapped model starts out equal to the original.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores [in, out]
        n_in, n_out = base.weight.shape[::-1] if not self.transposed else base.weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, n_in))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Module:
        """The base layer with the update added into its weight."""
        with torch.no_grad():
            delta = (self.lora_b @ self.lora_a) * self.scale  # [out, in]
            self.base.weight += delta.T if self.transposed else delta
        return self.base


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS_GPT2 = ("c_attn", "c_proj", "c_fc")


def add_lora(model: CausalLM, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze the model and wrap its attention and MLP projections; returns the LoRA parameters."""
    targets = LORA_TARGETS_GPT2 if model.config.family == "gpt2" else LORA_TARGETS
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for module in list(model.backbone.modules()):
        for name, child in list(module.named_children()):
            if name in targets and not isinstance(child, LoRA):
                wrapped = LoRA(child, rank, alpha if alpha is not None else 2.0 * rank)
                wrapped.to(child.weight.device)
                setattr(module, name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(model: CausalLM) -> None:
    """Fold every LoRA update into its base weight and unwrap it (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRA):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)


# -----------------------------------------------------------------------------
# the loop


@dataclass
class TrainOptions:
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 3e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 4
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 20
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    seed: int = 0
    lora: int = 0
    progress: bool = True
    progress_json: bool = False  # one JSON object per step on stdout (bot/finetune reads them)


@dataclass
class TrainState:
    """What a resumed run needs besides the model, optimizer and scheduler."""

    step: int = 0
    micro: int = 0  # micro-batches consumed (the data position)
    best_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    val_loss_before: float | None = None
    train_seconds: float = 0.0
    train_tokens: int = 0
    recent_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def total_steps(opts: TrainOptions, batches: TrainBatches) -> int:
    if opts.max_steps is not None:
        return opts.max_steps
    return max(1, math.ceil(opts.epochs * batches.per_epoch / opts.grad_accum))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains `model` on `batches`, evaluates on `val`, checkpoints into `partial`."""

    def __init__(
        self,
        model: CausalLM,
        batches: TrainBatches,
        val: list[Example],
        pad_id: int,
        opts: TrainOptions,
        partial: Path,
    ) -> None:
        self.model, self.batches, self.val, self.pad_id = model, batches, val, pad_id
        self.opts, self.partial = opts, partial
        self.device = next(model.parameters()).device
        self.lora_params = add_lora(model, opts.lora) if opts.lora else []
        self.params = self.lora_params or [p for p in model.parameters() if p.requires_grad]
        # the fused kernel is many times faster than the default per-tensor loop on the CPU
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay, fused=True
        )
        self.total = total_steps(opts, batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, opts.warmup_steps, self.total)
        )
        fp16 = self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.state = TrainState()
        self.best: dict[str, Tensor] | None = None
        self.best_saved = False  # whether partial/best.pt holds self.best

    # ---- checkpoints ----------------------------------------------------------------------------
    def trained_tensors(self) -> dict[str, Tensor]:
        """A CPU copy of what training changes: the LoRA factors, or every parameter."""
        if self.lora_params:
            return {
                n: p.detach().cpu().clone()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }
        return {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}

    def save(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        if self.best is not None and not self.best_saved:
            _atomic_save(self.best, self.partial / BEST_FILE)
            self.best_saved = True
        just_improved = self.best is not None and self.state.best_step == self.state.step
        _atomic_save(
            {
                "model": self.best if just_improved else self.trained_tensors(),  # no 2nd copy
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": self.state.__dict__,
                "rng": _rng_state(),
            },
            self.partial / STATE_FILE,
        )

    def load(self) -> None:
        file = self.partial / STATE_FILE
        try:
            saved = torch.load(file, map_location="cpu", weights_only=False)
            self.model.load_state_dict(saved["model"], strict=not self.lora_params)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = TrainState(**saved["state"])
            _set_rng_state(saved["rng"])
            best_file = self.partial / BEST_FILE
            if best_file.is_file():
                self.best = torch.load(best_file, map_location="cpu", weights_only=True)
                self.best_saved = True
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{file}: cannot resume ({first_line(exc)})") from None

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Validation loss; remembers the best weights; counts evaluations without improvement."""
        loss = mean_loss(self.model, self.val, self.pad_id, self.opts.batch_size)
        s = self.state
        if s.best_loss is None or loss < s.best_loss:
            s.best_loss, s.best_step, s.bad_evals = loss, s.step, 0
            self.best, self.best_saved = self.trained_tensors(), False
        else:
            s.bad_evals += 1
        return loss

    def restore_best(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best, strict=not self.lora_params)

    # ---- training -------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss."""
        losses = []
        for _ in range(self.opts.grad_accum):
            examples: list[Example] = []
            while not examples:  # a batch whose items all lost their labels is skipped
                examples = self.batches.batch(self.state.micro)
                self.state.micro += 1
            ids, labels = collate(examples, self.pad_id)
            with autocast_for(self.device):
                loss_sum, n = token_loss(self.model, ids.to(self.device), labels.to(self.device))
            loss = loss_sum / max(n, 1)
            self.scaler.scale(loss / self.opts.grad_accum).backward()
            losses.append(float(loss.detach()))
            self.state.train_tokens += sum(len(e.input_ids) for e in examples)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        return sum(losses) / len(losses)

    def run(self) -> TrainState:
        from tqdm import tqdm

        s, opts = self.state, self.opts
        if s.val_loss_before is None:
            s.val_loss_before = self.evaluate()
            print(f"step 0: val loss {s.val_loss_before:.4f}", file=sys.stderr)
        self.model.train()
        bar = tqdm(
            total=self.total,
            initial=s.step,
            desc="training",
            unit="step",
            file=sys.stderr,
            disable=not opts.progress,
            dynamic_ncols=True,
        )
        while s.step < self.total and not s.stopped_early:
            started = time.perf_counter()
            loss = self.step()
            elapsed = time.perf_counter() - started
            s.train_seconds += elapsed
            s.recent_losses = [*s.recent_losses, loss][-10:]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{s.train_tokens / s.train_seconds:.0f}")
            if opts.progress_json:
                report = {"event": "step", "step": s.step, "total": self.total, "loss": loss}
                print(json.dumps(report), flush=True)
            if s.step % opts.eval_every == 0 or s.step == self.total:
                val = self.evaluate()
                message = f"step {s.step}: val loss {val:.4f} (best {s.best_loss:.4f})"
                bar.write(message, file=sys.stderr)
                s.stopped_early = bool(opts.patience) and s.bad_evals >= opts.patience
                self.save()
        bar.close()
        self.restore_best()
        return s


# -----------------------------------------------------------------------------
# setting up the two commands


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_options(args: argparse.Namespace) -> None:
    positive = ("batch_size", "grad_accum", "max_length", "eval_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise ModelError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ModelError("--max-steps must be at least 1")
    if args.lr <= 0 or args.epochs <= 0:
        raise ModelError("--lr and --epochs must be positive")
    if getattr(args, "lora", 0) < 0 or args.patience < 0 or args.warmup_steps < 0:
        raise ModelError("--lora, --patience and --warmup-steps cannot be negative")


def _options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        max_steps=args.max_steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        lora=getattr(args, "lora", 0),
        progress=not args.no_progress,
        progress_json=getattr(args, "progress_json", False),
    )


def _prepare_data(
    dataset: Dataset, tokenizer: TokenizerBundle, args: argparse.Namespace
) -> tuple[TrainBatches, list[Example]]:
    """Split, encode the validation part now and the training part lazily."""
    from models.data import encode_conversation, split_items

    if getattr(args, "val_data", None):  # a held-out file: train on every item of --data
        from models.data import load_dataset

        train_items, val_items = dataset.items, load_dataset(args.val_data).items
    else:
        train_items, val_items = split_items(dataset.items, args.val_fraction)
    val = encode_items(tokenizer, val_items[: args.val_limit], args.max_length, dataset.is_dialogue)
    if not val:
        raise ModelError(f"{dataset.spec}: the validation part has no labelled tokens")
    if dataset.is_dialogue:
        batches = TrainBatches(
            train_items,
            lambda c: encode_conversation(tokenizer, c, args.max_length),
            args.batch_size,
            args.seed,
        )
    else:
        windows = encode_items(tokenizer, train_items, args.max_length, dialogue=False)
        batches = TrainBatches(windows, lambda e: e, args.batch_size, args.seed)
    return batches, val


def _fit(
    model: CausalLM,
    tokenizer: TokenizerBundle,
    dataset: Dataset,
    args: argparse.Namespace,
    fingerprint: dict[str, Any],
    generation_config: dict[str, Any],
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train, save the HF folder at args.out (atomically) and return the summary."""
    from models.checkpoint import save_hf_folder

    out = Path(args.out).expanduser()
    partial = out.with_name(out.name + ".partial")
    batches, val = _prepare_data(dataset, tokenizer, args)
    model.to(_device())
    trainer = Trainer(model, batches, val, pad_id_of(tokenizer), _options(args), partial)
    meta_file = partial / "run.json"
    if args.resume and (partial / STATE_FILE).is_file():
        recorded = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        changed = [k for k in fingerprint if recorded.get(k) != fingerprint[k]]
        if changed:
            raise ModelError(
                f"{partial}: was started with other settings ({', '.join(changed)}); "
                "run without --resume to start over"
            )
        trainer.load()
        print(f"resuming from step {trainer.state.step}", file=sys.stderr)
    else:
        if args.resume:
            print(f"{partial}: nothing to resume, starting from step 0", file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(fingerprint, indent=2) + "\n")
    if on_start is not None:
        on_start()
    state = trainer.run()
    val_after = state.best_loss
    if trainer.lora_params:
        merge_lora(model)
        val_after = mean_loss(model, val, trainer.pad_id, args.batch_size)
    save_hf_folder(
        model.config, model.hf_state_dict(), tokenizer, out, generation_config=generation_config
    )
    shutil.rmtree(partial, ignore_errors=True)
    steps_run = max(1, state.step)
    return {
        "steps": state.step,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "train_loss": sum(state.recent_losses) / max(1, len(state.recent_losses)),
        "val_loss_before": state.val_loss_before,
        "val_loss_after": val_after,
        "val_perplexity_before": perplexity(state.val_loss_before or 0.0),
        "val_perplexity_after": perplexity(val_after),
        "seconds_per_step": state.train_seconds / steps_run,
        "tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
        "train_conversations" if dataset.is_dialogue else "train_windows": len(batches.items),
        "val_examples": len(val),
        "lora": trainer.opts.lora,
        "device": str(trainer.device),
        "out": str(out),
    }


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['steps']} steps, {summary['seconds_per_step']:.2f} s/step, "
        f"{summary['tokens_per_second']:.0f} tokens/s; validation perplexity "
        f"{summary['val_perplexity_before']:.3f} -> {summary['val_perplexity_after']:.3f}; "
        f"saved {summary['out']}"
    )


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- finetune -----------------------------------------------------------------------------------


TRAIN_STEPS = 300  # `train` without --max-steps or --epochs: enough for a small model to learn
RUNS_DIR = "runs"  # under DATA_DIR (default: data), where outputs go unless --out says


def default_out(command: str) -> Path:
    """DATA_DIR/runs/COMMAND-YYYYmmdd-HHMMSS: outputs stay under the data folder (ignored by
    git), never in the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("DATA_DIR") or "data").expanduser() / RUNS_DIR / f"{command}-{stamp}"


def _fill_defaults(args: argparse.Namespace, command: str) -> None:
    """The defaults that depend on the command: the output folder; `train`'s length (one
    epoch of a short text is a single step, which teaches a model from scratch nothing)."""
    if args.out is None:
        args.out = str(default_out(command))
    if command == "train" and args.max_steps is None and args.epochs is None:
        args.max_steps = TRAIN_STEPS
    if args.epochs is None:
        args.epochs = 1.0


def _add_loop_arguments(parser: argparse.ArgumentParser, lr: float, batch_size: int) -> None:
    parser.add_argument("--data", required=True, help="chitchat, chatterbot:LANG, .jsonl or text")
    parser.add_argument(
        "--out",
        default=None,
        help="output HF folder, written atomically (default: data/runs/COMMAND-TIME)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help=f"passes over the data (default: 1; `train`: {TRAIN_STEPS} steps unless given)",
    )
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="sequences per micro-batch"
    )
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per conversation")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    parser.add_argument("--patience", type=int, default=0, help="stop after P evals without gain")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--val-limit", type=int, default=200, help="validation conversations used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT.partial")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--progress-json", action="store_true", help="a JSON line per step on stdout"
    )
    parser.add_argument(
        "--val-data", default=None, help="held-out data for validation (default: split --data)"
    )
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")


def _fingerprint(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    keys = ("data", "val_data", "max_length", "batch_size", "grad_accum", "seed", "val_fraction")
    keys += ("val_limit",)
    return {k: getattr(args, k) for k in keys} | extra


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base_dir", metavar="BASE_DIR", help="HF folder (or .gguf file) to tune")
    # measured on SmolLM2-135M and chatterbot:english (docs/training.md): 40 steps of 4
    # conversations at 3e-4 lower validation perplexity by about a third
    _add_loop_arguments(parser, lr=3e-4, batch_size=4)
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0: full)")


def finetune_main(args: argparse.Namespace) -> int:
    from models.checkpoint import load_checkpoint
    from models.data import load_dataset
    from models.model import CausalLM

    _fill_defaults(args, "finetune")
    _check_options(args)
    checkpoint = load_checkpoint(args.base_dir)
    dataset = load_dataset(args.data)
    _seed(args.seed)
    model = CausalLM.from_checkpoint(checkpoint)
    base = str(Path(args.base_dir).expanduser().resolve())
    fingerprint = _fingerprint(args, command="finetune", base=base, lora=args.lora)
    summary = _fit(
        model, checkpoint.tokenizer, dataset, args, fingerprint, checkpoint.generation_config
    )
    _report(summary, args.json)
    return 0


# ---- train from scratch -------------------------------------------------------------------------


def train_tokenizer(dataset: Dataset, vocab_size: int, max_length: int) -> TokenizerBundle:
    """A byte-level BPE tokenizer trained on the dataset, with the ChatML special tokens (and the
    ChatML chat template for dialogue)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from models.tokenizer import TokenizerBundle

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if dataset.is_dialogue:
        texts = (m["content"] for c in dataset.conversations for m in c)
    else:
        texts = iter(dataset.texts)
    tokenizer.train_from_iterator(texts, trainer)
    dialogue = dataset.is_dialogue
    return TokenizerBundle(
        tokenizer=tokenizer,
        chat_template=CHATML if dialogue else None,
        bos_token=None,
        eos_token="<|im_end|>" if dialogue else "<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def scratch_config(args: argparse.Namespace, tokenizer: TokenizerBundle) -> ModelConfig:
    """A small config of the chosen family sized by the command-line options."""
    from models.model import ModelConfig

    if args.width % args.heads:
        raise ModelError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    llama = args.family == "llama"
    return ModelConfig(
        family=args.family,
        model_type=args.family,
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.width,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        head_dim=args.width // args.heads,
        intermediate_size=(args.width * 8 // 3 + 31) // 32 * 32 if llama else 4 * args.width,
        max_position_embeddings=args.max_length,
        norm_eps=1e-5,
        rope_theta=10000.0 if llama else 0.0,
        tie_word_embeddings=True,
        attention_bias=not llama,
        bos_token_id=None,
        eos_token_id=tokenizer.token_id(tokenizer.eos_token),
        pad_token_id=tokenizer.token_id(tokenizer.pad_token),
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_loop_arguments(parser, lr=1e-3, batch_size=8)
    parser.add_argument("--family", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)


def train_main(args: argparse.Namespace) -> int:
    from models.data import load_dataset
    from models.model import CausalLM
    from models.tokenizer import TokenizerBundle

    _fill_defaults(args, "train")
    _check_options(args)
    for name in ("vocab_size", "layers", "width", "heads"):
        if getattr(args, name) < 1:
            raise ModelError(f"--{name.replace('_', '-')} must be at least 1")
    dataset = load_dataset(args.data)
    out = Path(args.out).expanduser()
    saved_tokenizer = out.with_name(out.name + ".partial") / "tokenizer"
    if args.resume and (saved_tokenizer / "tokenizer.json").is_file():
        tokenizer = TokenizerBundle.from_hf_folder(saved_tokenizer)
    else:
        tokenizer = train_tokenizer(dataset, args.vocab_size, args.max_length)
    _seed(args.seed)
    model = CausalLM(scratch_config(args, tokenizer))
    fingerprint = _fingerprint(
        args,
        command="train",
        family=args.family,
        vocab_size=args.vocab_size,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
    )
    args.lora = 0

    def keep_tokenizer() -> None:
        tokenizer.save(saved_tokenizer)

    summary = _fit(model, tokenizer, dataset, args, fingerprint, {}, on_start=keep_tokenizer)
    _report(summary, args.json)
    return 0
