"""TokenizerBundle: a tokenizers.Tokenizer plus chat template and special tokens; HF folder I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from models.chat_template import ChatTemplateError, render_chat
from models.errors import ModelError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json keys we carry through a load/save round trip. (add_bos_token and
# add_eos_token are not among them: with a tokenizer.json, its post-processor decides, as in
# transformers.)
_KEPT_CONFIG_KEYS = ("padding_side",)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a ModelError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_token(spec: dict[str, Any]) -> AddedToken:
    return AddedToken(
        spec["content"],
        single_word=spec.get("single_word", False),
        lstrip=spec.get("lstrip", False),
        rstrip=spec.get("rstrip", False),
        normalized=spec.get("normalized", not spec.get("special", False)),
        special=spec.get("special", False),
    )


def _chat_template_from(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@dataclass
class TokenizerBundle:
    """Everything needed to turn a conversation into token ids and back."""

    tokenizer: Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    model_max_length: int | None = None
    padding_side: str | None = None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, path: str | Path) -> TokenizerBundle:
        """Load tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat template."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ModelError(f"{tokenizer_file}: not a valid tokenizers file ({exc})") from None
        config_file = folder / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        map_file = folder / "special_tokens_map.json"
        special_map = read_json(map_file) if map_file.is_file() else {}

        cls._add_missing_tokens(tokenizer, config.get("added_tokens_decoder") or {}, config_file)
        specials = {
            name: _token_text(config.get(name)) or _token_text(special_map.get(name))
            for name in SPECIAL_NAMES
        }
        max_length = config.get("model_max_length")
        bundle = cls(
            tokenizer=tokenizer,
            chat_template=_chat_template_from(folder, config),
            model_max_length=int(max_length) if isinstance(max_length, int | float) else None,
            **specials,
            **{k: config[k] for k in _KEPT_CONFIG_KEYS if k in config},
        )
        bundle._register_named_specials()
        return bundle

    @staticmethod
    def _add_missing_tokens(tokenizer: Tokenizer, decoder: dict[str, Any], source: Path) -> None:
        """Add the entries of added_tokens_decoder that tokenizer.json lacks, checking their ids."""
        present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
                raise ModelError(f"{source}: malformed added_tokens_decoder entry {key!r}")
            if spec["content"] in present:
                continue
            token = _added_token(spec)
            if token.special:
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            got = tokenizer.token_to_id(spec["content"])
            if got != int(key):
                raise ModelError(
                    f"{source}: added token {spec['content']!r} has id {key} but the vocabulary "
                    f"gives it id {got}"
                )

    def _register_named_specials(self) -> None:
        """Named special tokens are never split: register any that tokenizer.json lacks."""
        present = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if token is not None and token not in present:
                added = AddedToken(token, special=True, normalized=False)
                self.tokenizer.add_special_tokens([added])
                present.add(token)

    # ---- saving --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the template
        (chat_template.jinja), so that transformers' AutoTokenizer loads the same tokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        specials = {name: getattr(self, name) for name in SPECIAL_NAMES}
        specials = {k: v for k, v in specials.items() if v is not None}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "single_word": t.single_word,
                    "lstrip": t.lstrip,
                    "rstrip": t.rstrip,
                    "normalized": t.normalized,
                    "special": t.special,
                }
                for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())
            },
            **specials,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        for key in _KEPT_CONFIG_KEYS:
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        (out / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (out / "special_tokens_map.json").write_text(
            json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        jinja = out / "chat_template.jinja"
        if self.chat_template is not None:
            jinja.write_text(self.chat_template, encoding="utf-8")
        elif jinja.exists():
            jinja.unlink()

    # ---- use -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens(self) -> dict[int, AddedToken]:
        """id -> AddedToken for every added token (special or not)."""
        return dict(self.tokenizer.get_added_tokens_decoder())

    @property
    def special_tokens(self) -> list[str]:
        """The text of every special token, in id order."""
        return [t.content for _, t in sorted(self.added_tokens.items()) if t.special]

    def token_id(self, token: str | None) -> int | None:
        """The id of a token's text (None for None or an unknown token)."""
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are matched whole; the
        post-processor (e.g. a BOS) runs only with add_special_tokens, since chat templates write
        their own."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, lossless (no clean-up of spaces before punctuation)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The conversation as prompt text, rendered with this tokenizer's chat template."""
        if self.chat_template is None:
            raise ModelError("this tokenizer has no chat template")
        try:
            return render_chat(
                self.chat_template,
                messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                unk_token=self.unk_token,
                pad_token=self.pad_token,
                **extra,
            )
        except ChatTemplateError as exc:
            raise ModelError(str(exc)) from None
