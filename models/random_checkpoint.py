"""Random-weight Hugging Face checkpoints, built with transformers (not with our model code)."""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import ModelError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Hello there! How are you doing today?",
    "I'm fine, thanks. What about you?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Discord bots answer in channels, threads and direct messages.",
    "Ünïcödé text, emoji 🙂 and 日本語 should survive a round trip.",
] * 20


def write_tokenizer(out: Path, vocab_size: int, max_length: int = 256) -> None:
    """A byte-level BPE tokenizer trained on a little text; ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": max_length,
                "chat_template": CHATML,
            }
        )
    )


KINDS = ("llama", "llama-untied", "qwen2", "gpt2", "smollm2-135m")

# SmolLM2-135M-Instruct's config.json (the default model): a random checkpoint of its shape is a
# fair speed workload (scripts/gpu_check.py) and gives the kernels' shapes (bench_kernels.py)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def make_checkpoint(out: Path, kind: str, seed: int = 0) -> Path:
    """A random-weight HF folder: tiny llama (GQA), qwen2 (qkv bias), llama-untied or gpt2, or
    smollm2-135m (the default model's shape). Used by the test fixtures and by the scripts that
    need a model of a real shape; needs transformers (the `dev` extra)."""
    if kind not in KINDS:
        raise ModelError(
            f"unknown random checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}"
        )
    try:
        import torch
        import transformers as tf
    except ImportError as exc:
        raise ModelError(f"random checkpoints need torch and transformers: {exc}") from exc

    torch.manual_seed(seed)
    vocab = 384
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gqa_shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "smollm2-135m":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**(common | SMOLLM2_135M)))
    elif kind in ("llama", "llama-untied"):
        cfg = tf.LlamaConfig(
            rope_theta=10000.0, tie_word_embeddings=(kind == "llama"), **gqa_shape, **common
        )
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=False, **gqa_shape, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    else:  # gpt2
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        model = tf.GPT2LMHeadModel(cfg)
    # random init is small; widen it so logits differ meaningfully between tokens
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, vocab)  # a few hundred tokens are enough to talk to any of them
    return out
