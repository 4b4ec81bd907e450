"""Fixtures of the model I/O tests: tiny GGUF files, and the real default model, converted once."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.fetch import default_cache_dir, fetch_default, fetch_gguf

from .gguf_files import write_tiny_llama

# Text that tends to break tokenizers: code, emoji, non-Latin scripts, whitespace runs, specials.
TEXTS = [
    "Hello world! How are you doing today?",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(2, 40))\n",
    'if (x != 0) { y = x ** 2; } else { y = -1; }  // {"k": [1, 2.5e-3]}',
    "Emoji 🙂🚀👍🏽 and a family 👨‍👩‍👧 in one line",
    "日本語の文章です。中文句子也可以。한국어 문장",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "   leading spaces, \t\ttabs,   runs of   spaces   \n\n\n\n and newlines\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>specials <|im_start|>",
    "I'm sure they'll say we've won 3.14159 times in 2024, 1234567 or 00042.",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are a terse bot."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?\n\nI really want to know 🙂"},
        {"role": "assistant", "content": "To get to the other side."},
    ],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Ça va ?"},
    ],
]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The download cache shared by every run ($DISCORD_LLM_CACHE or ~/.cache/discord-llm)."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def default_gguf(cache_dir: Path) -> Path:
    """The pinned SmolLM2-135M-Instruct GGUF file (downloaded once into the cache)."""
    return fetch_gguf(cache_dir, progress=False)


@pytest.fixture(scope="session")
def default_model_dir(cache_dir: Path, default_gguf: Path) -> Path:
    """The default model converted to an HF folder in the cache; converted once, then reused."""
    return fetch_default(cache_dir / "SmolLM2-135M-Instruct", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama GGUF files written from the tiny HF checkpoints, keyed by name."""
    from gguf import GGMLQuantizationType as Q

    root = tmp_path_factory.mktemp("tiny-gguf")
    specs = {
        "llama-q8_0": ("llama", Q.Q8_0),
        "llama-untied-f16": ("llama-untied", Q.F16),
        "llama-f32": ("llama", Q.F32),
    }
    return {
        name: write_tiny_llama(tiny_checkpoints[kind], root / f"{name}.gguf", quant=quant)
        for name, (kind, quant) in specs.items()
    }
