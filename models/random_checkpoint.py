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


# one tiny checkpoint per family with its quirks switched on: rope scaling past the original
# length, sliding windows shorter than the test prompts, soft-caps that bind (FAMILY_KINDS)
FAMILY_KINDS = (
    "llama3",
    "llama-yarn",
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "smollm3",
    "granite",
    "olmo2",
)
KINDS = ("llama", "llama-untied", "qwen2", "gpt2", "smollm2-135m", *FAMILY_KINDS)
WINDOW = 24  # the tiny models' sliding window, in tokens
POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")

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
    elif kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        # tied heads: the logits of a random model are then peaked enough for int4's top-1 bar,
        # as a trained model's are (untied heads: the llama-untied and qwen2 kinds)
        shape = common | gqa_shape | {"max_position_embeddings": 512, "tie_word_embeddings": True}
        model = _family_model(tf, kind, shape)
    # random init is small; widen it so logits differ meaningfully between tokens
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # norms of sublayer outputs (Gemma 2/3, OLMo 2) at a trained model's small scale: at 1
        # they drown the token's embedding in random features and flatten the logits
        offset = 1.0 if kind.startswith("gemma") else 0.0
        for name, p in model.named_parameters():
            if name.endswith(POST_NORMS) and kind in ("gemma2", "gemma3", "olmo2"):
                p.copy_(torch.full_like(p, 0.1 - offset) + torch.randn_like(p) * 0.01)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, vocab)  # a few hundred tokens are enough to talk to any of them
    return out


def _family_model(tf, kind: str, shape: dict):
    """A tiny model of one of FAMILY_KINDS (transformers' own class) with its quirks on."""
    two = ["sliding_attention", "full_attention"]
    if kind == "llama3":
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)  # fmt: skip
        eos = {"eos_token_id": [2, 0]}  # several stop ids
        return tf.LlamaForCausalLM(tf.LlamaConfig(rope_parameters=rope, **(shape | eos)))
    if kind == "llama-yarn":
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                    original_max_position_embeddings=128)  # fmt: skip
        cfg = tf.LlamaConfig(rope_parameters=rope, **shape)
        return tf.LlamaForCausalLM(cfg)
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=WINDOW, **shape))
    if kind == "qwen3":  # head_dim apart from hidden / heads
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**(shape | {"head_dim": 32})))
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **shape))
    if kind == "gemma2":
        cfg = tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                              attn_logit_softcapping=0.1, final_logit_softcapping=0.6,
                              layer_types=two, **shape)  # fmt: skip
        return tf.Gemma2ForCausalLM(cfg)
    if kind == "gemma3":
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
        cfg = tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                  layer_types=two, rope_parameters=rope, **shape)  # fmt: skip
        return tf.Gemma3ForCausalLM(cfg)
    if kind == "phi3":  # fused projections, partial rotary, LongRoPE, a window on every layer
        dims = 8  # rotary dims / 2
        rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                    short_factor=[1.0 + 0.1 * i for i in range(dims)],
                    long_factor=[2.0 + 0.5 * i for i in range(dims)])  # fmt: skip
        phi = shape | {"num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0}
        phi |= {"max_position_embeddings": 2048}
        cfg = tf.Phi3Config(rope_parameters=rope, original_max_position_embeddings=512,
                            sliding_window=WINDOW, **phi)  # fmt: skip
        return tf.Phi3ForCausalLM(cfg)
    if kind == "smollm3":
        return tf.SmolLM3ForCausalLM(tf.SmolLM3Config(no_rope_layers=[1, 0], **shape))
    if kind == "granite":
        cfg = tf.GraniteConfig(embedding_multiplier=6.0, attention_multiplier=0.2,
                               residual_multiplier=0.5, logits_scaling=0.25, **shape)  # fmt: skip
        return tf.GraniteForCausalLM(cfg)
    if kind == "olmo2":
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**shape))
    raise ModelError(f"unknown family kind {kind!r}")
