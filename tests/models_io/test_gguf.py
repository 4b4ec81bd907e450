"""GGUF import: dequantization per tensor type, the q/k un-permutation, tokenizer, and bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.checkpoint import load_checkpoint
from models.errors import ModelError
from models.gguf import dequantize, open_gguf, read_gguf
from models.tokenizer import TokenizerBundle

from .conftest import CONVERSATIONS, TEXTS
from .gguf_files import encode, write_raw_tensors, write_tiny_llama

# Worst-case absolute error of each type on values in [-1, 1] (half a quantization step, or a
# full step where the encoder clips the extreme value).
QUANTIZABLE = {
    Q.F32: 0.0,
    Q.F16: 2**-11,
    Q.BF16: 2**-8,
    Q.Q8_0: 1 / 127,
    Q.Q4_0: 1 / 8,
    Q.Q4_1: 2 / 15,
    Q.Q5_0: 1 / 16,
    Q.Q5_1: 2 / 31,
}
# byte offsets of the fp16 scale fields in one block, for building valid random K-quant blocks
SCALE_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
}


def _read_back(path):
    reader = open_gguf(path)
    return {t.name: dequantize(t, path) for t in reader.tensors}


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_dequantized_values_are_within_type_precision(tmp_path, qtype):
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, size=(6, 256)).astype(np.float32)
    path = write_raw_tensors(tmp_path / "t.gguf", {"w": (encode(values, qtype), qtype)})
    got = _read_back(path)["w"]
    assert got.shape == values.shape and got.dtype == np.float32
    error = np.abs(got - values).max()
    assert error <= QUANTIZABLE[qtype] + 1e-7
    if qtype != Q.F32:  # the file really was stored in the lossy type
        assert error > 0


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda q: q.name)
def test_block_types_match_transformers_dequantizer(tmp_path, qtype):
    """Random blocks (with sane fp16 scales) decode to what transformers' own kernels give."""
    from gguf.constants import GGML_QUANT_SIZES
    from transformers.integrations.gguf.dequant import dequantize as reference

    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 4, 2
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        scales = rng.uniform(-1, 1, size=rows * blocks_per_row).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, blocks_per_row * block_bytes)

    path = write_raw_tensors(tmp_path / "k.gguf", {"w": (raw, qtype)})
    got = _read_back(path)["w"]
    expected = reference(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()
    assert got.shape == (rows, blocks_per_row * block_values)
    np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,data,qtype",
    [
        ("blk.0.attn_q.weight", np.arange(64, dtype=np.int32).reshape(2, 32), Q.I32),
        ("blk.0.ffn_up.weight", np.zeros((2, 292), dtype=np.uint8), Q.Q8_K),
    ],
    ids=["I32", "Q8_K"],
)
def test_unsupported_type_names_tensor_and_type(tmp_path, name, data, qtype):
    path = write_raw_tensors(tmp_path / "u.gguf", {name: (data, qtype)})
    reader = open_gguf(path)
    with pytest.raises(ModelError) as info:
        dequantize(reader.tensors[0], path)
    message = str(info.value)
    assert name in message and qtype.name in message and "Q4_K" in message and "u.gguf" in message


@pytest.mark.parametrize("name", ["llama-q8_0", "llama-untied-f16"])
def test_tiny_llama_matches_transformers_gguf_loader(tiny_ggufs, tiny_checkpoints, name):
    path = tiny_ggufs[name]
    ours = read_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    untied = "untied" in name
    assert ours.hf_config["tie_word_embeddings"] is not untied
    assert ("lm_head.weight" in ours.tensors) is untied
    for key, value in ours.tensors.items():
        np.testing.assert_allclose(value, ref[key].numpy(), rtol=0, atol=1e-6, err_msg=key)

    # and both equal the original weights (q/k rows back in HF order) within the type's precision
    source = tiny_checkpoints["llama-untied" if untied else "llama"]
    original = load_file(source / "model.safetensors")
    assert set(ours.tensors) == set(original)
    for key, value in ours.tensors.items():
        scale = np.abs(original[key]).max()
        assert np.abs(value - original[key]).max() <= scale / 100, key

    config = json.loads((source / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ):
        assert ours.hf_config[key] == config[key], key
    assert ours.hf_config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert ours.hf_config["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"])


def test_tiny_llama_tokenizer_matches_source_and_transformers(tiny_ggufs, tiny_checkpoints):
    path = tiny_ggufs["llama-f32"]
    ours = read_gguf(path).tokenizer
    source = TokenizerBundle.from_hf_folder(tiny_checkpoints["llama"])
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == source.encode(text) == ref.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        source.bos_token,
        source.eos_token,
        source.pad_token,
    )
    assert ours.special_tokens == source.special_tokens
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == source.apply_chat_template(messages)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_pre_tokenizer_types_match_transformers(tiny_checkpoints, tmp_path, pre):
    path = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / f"{pre}.gguf", pre=pre)
    ours = read_gguf(path).tokenizer
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=True), text


def test_add_bos_token_metadata_matches_transformers(tiny_checkpoints, tmp_path):
    path = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / "bos.gguf", add_bos=True)
    ours = read_gguf(path).tokenizer
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    bos = ours.token_id(ours.bos_token)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert ids[0] == bos and ids[1:] == ours.encode(text)
    ours.save(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t, True) for t in TEXTS]


def test_unknown_pre_tokenizer_is_refused(tiny_checkpoints, tmp_path):
    path = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / "x.gguf", pre="no-such-pre")
    with pytest.raises(ModelError, match="pre-tokenizer 'no-such-pre' is not supported"):
        read_gguf(path)


def test_truncated_file_is_a_clear_error(tiny_ggufs, tmp_path):
    data = tiny_ggufs["llama-f32"].read_bytes()
    for size in (len(data) - 100, len(data) // 2, 40, 0):
        path = tmp_path / f"cut-{size}.gguf"
        path.write_bytes(data[:size])
        with pytest.raises(ModelError, match=f"cut-{size}.gguf") as info:
            read_gguf(path)
        assert "\n" not in str(info.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match=r"junk\.gguf: corrupt or truncated GGUF file"):
        read_gguf(path)
    with pytest.raises(ModelError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_wrong_architecture_and_missing_tensors(tmp_path):
    weights = {"token_embd.weight": (np.zeros((8, 4), np.float32), Q.F32)}
    path = write_raw_tensors(tmp_path / "gpt.gguf", weights, arch="gpt2")
    with pytest.raises(ModelError, match=r"architecture 'gpt2' is not supported.*llama"):
        read_gguf(path)
    path = write_raw_tensors(tmp_path / "partial.gguf", weights, arch="llama")
    with pytest.raises(ModelError, match=r"partial\.gguf: GGUF metadata lacks llama"):
        read_gguf(path)


def test_tensors_that_disagree_with_the_metadata_are_refused_at_load(tiny_checkpoints, tmp_path):
    """A GGUF file gets the same tensor check as a Hugging Face folder, naming the file."""
    hf_dir = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "hf"))
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] += 32  # the metadata now says 160; the tensors are 128 wide
    (hf_dir / "config.json").write_text(json.dumps(config))
    path = write_tiny_llama(hf_dir, tmp_path / "odd.gguf")
    with pytest.raises(ModelError, match=r"odd\.gguf: tensor model\.layers\.0\.mlp\..* has shape"):
        load_checkpoint(path)


def test_load_gguf_gives_a_checkpoint_our_model_runs(tiny_ggufs):
    from models.checkpoint import load_checkpoint
    from models.model import CausalLM

    path = tiny_ggufs["llama-untied-f16"]
    ckpt = load_checkpoint(path)
    assert ckpt.source == path and ckpt.source_files == [path]
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    assert (ckpt.config.num_heads, ckpt.config.num_kv_heads) == (4, 2)
    assert ckpt.config.tie_word_embeddings is False
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

    ids = torch.tensor([ckpt.tokenizer.encode("Hello there! <|im_end|> 日本語 🙂")])
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        logits, _ = CausalLM.from_checkpoint(ckpt).eval()(ids)
        expected = ref(ids).logits
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("quant", [Q.F32, Q.Q8_0])
def test_tiny_qwen2_gguf_matches_transformers_gguf_loader(tiny_checkpoints, tmp_path, quant):
    """Another architecture through gguf's name map: Qwen2 (q/k/v biases, rows not permuted)."""
    from models.checkpoint import load_checkpoint

    source = tiny_checkpoints["qwen2"]
    path = write_tiny_llama(source, tmp_path / "qwen2.gguf", quant=quant, arch="qwen2")
    ckpt = load_checkpoint(path)
    assert ckpt.config.model_type == "qwen2" and ckpt.config.attention_bias
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    original = load_file(source / "model.safetensors")
    assert set(ckpt.tensors) == set(original)
    for key, value in ckpt.tensors.items():
        np.testing.assert_allclose(value.numpy(), ref[key].numpy(), rtol=0, atol=1e-6, err_msg=key)
        if quant == Q.F32:
            np.testing.assert_array_equal(value.numpy(), original[key], err_msg=key)


def test_tiny_qwen3_gguf_gives_the_original_tensors(family_checkpoints, tmp_path):
    """Qwen3: q/k norms and a head_dim apart from hidden/heads, named through TensorNameMap."""
    from models.checkpoint import load_checkpoint

    source = family_checkpoints["qwen3"]
    path = write_tiny_llama(source, tmp_path / "qwen3.gguf", arch="qwen3")
    ckpt = load_checkpoint(path)
    config = json.loads((source / "config.json").read_text())
    assert ckpt.config.model_type == "qwen3" and ckpt.config.head_dim == config["head_dim"]
    original = load_file(source / "model.safetensors")
    assert set(ckpt.tensors) == set(original)
    for key, value in ckpt.tensors.items():
        np.testing.assert_array_equal(value.numpy(), original[key], err_msg=key)


@pytest.mark.parametrize(
    ("kind", "arch"),
    [("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3", "gemma3"), ("phi3", "phi3")],
)
def test_family_gguf_tensor_names_map_back(family_checkpoints, tmp_path, kind, arch):
    """Every tensor of Gemma 1-3 (norms stored as 1 + w) and Phi-3 (fused qkv and gate_up)
    comes back under its HF name. The config keys GGUF has no field for (soft-caps and windows
    this writer leaves out, LongRoPE factors) are not checked here."""
    from models.checkpoint import load_checkpoint

    source = family_checkpoints[kind]
    path = write_tiny_llama(source, tmp_path / f"{kind}.gguf", arch=arch)
    ckpt = load_checkpoint(path)
    assert ckpt.config.model_type == json.loads((source / "config.json").read_text())["model_type"]
    original = load_file(source / "model.safetensors")
    assert set(ckpt.tensors) == set(original)
    for key, value in ckpt.tensors.items():
        np.testing.assert_allclose(value.numpy(), original[key], rtol=0, atol=1e-6, err_msg=key)
