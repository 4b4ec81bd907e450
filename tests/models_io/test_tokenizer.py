"""TokenizerBundle: ids, decoding and chat rendering equal transformers', before and after save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.errors import ModelError
from models.tokenizer import TokenizerBundle

from .conftest import CONVERSATIONS, TEXTS


def assert_same_tokenizer(ours: TokenizerBundle, ref) -> None:
    """Ids, decoding, special tokens and chat rendering of `ours` equal transformers' `ref`."""
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.vocab_size == len(ref)
    assert {k: getattr(ours, k) for k in ref.special_tokens_map} == ref.special_tokens_map
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            expected = ref.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=False
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


# Not "qwen2": for that model_type transformers swaps in Qwen2Tokenizer, whose own pre-tokenizer
# replaces the one in the fixture's (generic) tokenizer.json.
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_folder_matches_transformers(tiny_checkpoints, kind):
    folder = tiny_checkpoints[kind]
    assert_same_tokenizer(
        TokenizerBundle.from_hf_folder(folder), AutoTokenizer.from_pretrained(folder)
    )


def test_saved_folder_loads_in_transformers_unchanged(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    ours = TokenizerBundle.from_hf_folder(source)
    ours.save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "chat_template.jinja").read_text() == ours.chat_template
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(ours, reloaded)
    assert_same_tokenizer(
        TokenizerBundle.from_hf_folder(tmp_path), AutoTokenizer.from_pretrained(source)
    )
    assert reloaded.model_max_length == ours.model_max_length == 256


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest


def test_config_variants_match_transformers(tiny_checkpoints, tmp_path):
    """Special tokens as AddedToken dicts, the template in chat_template.jinja, pad only in
    special_tokens_map.json, and an added token that tokenizer.json lacks."""
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "variant")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # both places hold a template: chat_template.jinja wins
    template = config["chat_template"].replace("<|im_start|>", "<|im_start|>[jinja]")
    (folder / "chat_template.jinja").write_text(template)
    config["bos_token"] = {
        "__type": "AddedToken",
        "content": "<|im_start|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    pad = config.pop("pad_token")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    new_id = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    config["added_tokens_decoder"] = {
        str(new_id): {
            "content": "<tool_call>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    ours, ref = TokenizerBundle.from_hf_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == template
    assert ours.pad_token == pad and ours.bos_token == "<|im_start|>"
    assert ours.encode("a<tool_call>b") == ref.encode("a<tool_call>b", add_special_tokens=False)
    assert new_id in ours.encode("a<tool_call>b")
    assert "<tool_call>" in ours.special_tokens
    assert_same_tokenizer(ours, ref)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"no tokenizer\.json") as info:
        TokenizerBundle.from_hf_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_malformed_tokenizer_config_names_the_file(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "bad")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"tokenizer_config\.json"):
        TokenizerBundle.from_hf_folder(folder)


def test_corrupt_tokenizer_json_names_the_file(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "bad")
    (folder / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ModelError, match=r"tokenizer\.json"):
        TokenizerBundle.from_hf_folder(folder)


def test_template_errors_become_model_errors(tiny_checkpoints):
    ours = TokenizerBundle.from_hf_folder(tiny_checkpoints["llama"])
    ours.chat_template = "{{ raise_exception('no') }}"
    with pytest.raises(ModelError, match="chat template error: no"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    ours.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_post_processor_of_tokenizer_json_decides_special_tokens(tiny_checkpoints, tmp_path):
    """A BOS-adding post-processor in tokenizer.json applies with add_special_tokens, and
    add_bos_token/add_eos_token in tokenizer_config.json do not override it (as in transformers)."""
    from tokenizers import Tokenizer, processors

    folder = _copy(tiny_checkpoints["llama"], tmp_path / "bos")
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    backend.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"add_bos_token": False, "add_eos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    ours, ref = TokenizerBundle.from_hf_folder(folder), AutoTokenizer.from_pretrained(folder)
    ours.save(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text) == again.encode(text), text
        assert ids[0] == bos and ids[1:] == ours.encode(text)
