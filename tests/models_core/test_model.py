"""CausalLM against transformers, and its cached, padded and training paths against itself."""

from __future__ import annotations

import pytest
import torch

from models.errors import ModelError
from models.model import SUPPORTED_MODEL_TYPES, CausalLM, ModelConfig
from tests.models_core.helpers import KINDS, ours, random_ids, reference, relative_error

TOLERANCE = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_full_sequence_logits_match_transformers(tiny_checkpoints, kind):
    model, ref = ours(tiny_checkpoints[kind]), reference(tiny_checkpoints[kind])
    ids = random_ids(model.config.vocab_size, 2, 33, seed=1)
    with torch.no_grad():
        logits, present = model(ids)
        want = ref(ids).logits
    assert logits.dtype == torch.float32
    _close(logits, want)
    cfg = model.config
    assert len(present) == cfg.num_layers
    for k, v in present:
        assert k.shape == v.shape == (2, cfg.num_kv_heads, 33, cfg.head_dim)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_transformers_cache(tiny_checkpoints, kind):
    """Our per-layer cache holds the same keys and values as transformers' after a prefill."""
    model, ref = ours(tiny_checkpoints[kind]), reference(tiny_checkpoints[kind])
    ids = random_ids(model.config.vocab_size, 1, 9, seed=2)
    with torch.no_grad():
        _, present = model(ids)
        cache = ref(ids, use_cache=True).past_key_values
    for layer, (k, v) in enumerate(present):
        _close(k, cache.layers[layer].keys)
        _close(v, cache.layers[layer].values)


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_full_sequence(tiny_checkpoints, kind):
    model = ours(tiny_checkpoints[kind])
    ids = random_ids(model.config.vocab_size, 2, 20, seed=3)
    with torch.no_grad():
        full, _ = model(ids)
        steps, past = model(ids[:, :12])
        pieces = [steps]
        for t in range(12, 20):
            step, past = model(ids[:, t : t + 1], past_key_values=past)
            pieces.append(step)
    assert past[0][0].shape[2] == 20
    _close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_equals_full_sequence(tiny_checkpoints, kind):
    """Several tokens at once on top of a cache need a causal mask offset by the past."""
    model = ours(tiny_checkpoints[kind])
    ids = random_ids(model.config.vocab_size, 1, 18, seed=4)
    with torch.no_grad():
        full, _ = model(ids)
        first, past = model(ids[:, :7])
        second, past = model(ids[:, 7:], past_key_values=past)
    _close(torch.cat([first, second], dim=1), full)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_single_rows(tiny_checkpoints, kind):
    model = ours(tiny_checkpoints[kind])
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    rows = [random_ids(vocab, 1, n, seed=10 + n) for n in (9, 4, 6)]
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    new_tokens = random_ids(vocab, len(rows), 3, seed=5)
    with torch.no_grad():
        batch, past = model(ids, attention_mask=mask)
        batch_steps = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            step, past = model(new_tokens[:, t : t + 1], past_key_values=past, attention_mask=mask)
            batch_steps.append(step)
        for i, r in enumerate(rows):
            n = r.shape[1]
            single, single_past = model(r)
            _close(batch[i : i + 1, width - n :], single)
            for t in range(3):
                step, single_past = model(new_tokens[i : i + 1, t : t + 1], single_past)
                _close(batch_steps[t][i : i + 1], step)


def test_explicit_position_ids_are_used(tiny_checkpoints):
    model = ours(tiny_checkpoints["llama"])
    ids = random_ids(model.config.vocab_size, 1, 6, seed=6)
    with torch.no_grad():
        default, _ = model(ids)
        same, _ = model(ids, position_ids=torch.arange(6)[None])
        # rotary attention only sees relative positions: a uniform shift changes nothing, a gap does
        shifted, _ = model(ids, position_ids=torch.arange(6)[None] + 5)
        gapped, _ = model(ids, position_ids=torch.tensor([[0, 1, 2, 9, 10, 11]]))
    assert torch.equal(default, same)
    assert relative_error(shifted, default) < TOLERANCE
    assert relative_error(gapped[:, 3:], default[:, 3:]) > 1e-3


def test_attention_mask_of_wrong_length_is_rejected(tiny_checkpoints):
    model = ours(tiny_checkpoints["gpt2"])
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_lowers_loss_and_keeps_ties(tiny_checkpoints, kind):
    model = ours(tiny_checkpoints[kind]).train()
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.input_embedding.weight) == tied
    ids = random_ids(model.config.vocab_size, 4, 16, seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    assert (model.lm_head.weight is model.input_embedding.weight) == tied


@pytest.mark.parametrize("kind", KINDS)
def test_num_parameters_matches_transformers(tiny_checkpoints, kind):
    model, ref = ours(tiny_checkpoints[kind]), reference(tiny_checkpoints[kind])
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()


@pytest.mark.parametrize("kind", KINDS)
def test_hf_state_dict_names_match_the_checkpoint(tiny_checkpoints, kind):
    from safetensors import safe_open

    model = ours(tiny_checkpoints[kind])
    with safe_open(tiny_checkpoints[kind] / "model.safetensors", framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    state = model.hf_state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[name], stored[name]) for name in state)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_hf_dict(tiny_checkpoints, kind):
    import json

    import transformers

    hf = json.loads((tiny_checkpoints[kind] / "config.json").read_text())
    config = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(config.to_hf()) == config
    reloaded = transformers.AutoConfig.for_model(**config.to_hf())
    assert reloaded.model_type == hf["model_type"]
    assert reloaded.vocab_size == hf["vocab_size"]


def test_config_reads_rope_theta_and_gqa(tiny_checkpoints):
    import json

    llama = ModelConfig.from_hf(json.loads((tiny_checkpoints["llama"] / "config.json").read_text()))
    qwen2 = ModelConfig.from_hf(json.loads((tiny_checkpoints["qwen2"] / "config.json").read_text()))
    assert (llama.num_heads, llama.num_kv_heads, llama.rope_theta) == (4, 2, 10000.0)
    assert llama.tie_word_embeddings and not llama.attention_bias
    assert qwen2.rope_theta == 1e6 and qwen2.attention_bias and not qwen2.tie_word_embeddings
    legacy = {**llama.to_hf(), "rope_theta": 5e5}
    del legacy["rope_parameters"]
    assert ModelConfig.from_hf(legacy).rope_theta == 5e5


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ModelError) as err:
        ModelConfig.from_hf({"model_type": "bert", "hidden_size": 8})
    message = str(err.value)
    assert "'bert'" in message
    assert all(name in message for name in SUPPORTED_MODEL_TYPES)


def test_unsupported_rope_scaling_is_rejected(tiny_checkpoints):
    import json

    hf = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ModelError, match="rope_type 'llama3'"):
        ModelConfig.from_hf(hf)


def test_fresh_model_has_small_random_weights():
    config = ModelConfig(
        family="llama", model_type="llama", vocab_size=50, hidden_size=32, num_layers=1,
        num_heads=4, num_kv_heads=1, head_dim=8, intermediate_size=64,
        max_position_embeddings=64, norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip
    model = CausalLM(config)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert 0.01 < weight.std().item() < 0.03
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    logits, present = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50)
    assert present[0][0].shape == (1, 1, 3, 8)
