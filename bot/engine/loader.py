"""Load a registry version: manifest, tokenizer, chat template, stop tokens, generation defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from bot.engine.types import ModelLoadError
from export.manifest import Manifest, ManifestError
from export.registry import Registry, RegistryError, default_registry
from models.chat_encoding import ChatEncoder
from models.chat_template import render_chat

NO_ACTIVE = (
    "no active model in the registry {registry}: create one with `make model` (or "
    "`python -m export ensure-default CHECKPOINT --name NAME`), choose one with "
    "`python -m export use NAME@N`, or name a version with --model / MODEL"
)


@dataclass
class LoadedModel:
    """Everything the engine and the bot need from one version folder (no ONNX session)."""

    path: Path
    manifest: Manifest
    tokenizer: Tokenizer
    chat: ChatEncoder  # the tokenizer with the chat template: prompts where user text stays text

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def max_context(self) -> int:
        return self.manifest.graph.max_context

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest.graph.file

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        ids = list(self.manifest.tokenizer.stop_token_ids)
        eos = self.manifest.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return tuple(ids)

    @property
    def generation(self) -> dict[str, Any]:
        return dict(self.manifest.generation)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, through the version's chat template."""
        info = self.manifest.tokenizer
        if not info.chat_template:
            raise ModelLoadError(f"{self.ref} has no chat template; use a plain prompt")
        return render_chat(
            info.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            unk_token=info.unk_token,
            pad_token=info.pad_token,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text from the operator: special-token strings in it become special tokens
        (use encode_text or encode_prompt for anything a user wrote)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of user text: special-token strings in it are plain characters."""
        return self.chat.encode_text(text)

    def encode_prompt(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
    ) -> tuple[str, list[int]]:
        """(prompt text, ids) of a conversation through the chat template; only the template's
        own markup becomes special tokens, never the text of a message. `template_vars`: extra
        variables the template reads (enable_thinking)."""
        if not self.manifest.tokenizer.chat_template:
            raise ModelLoadError(f"{self.ref} has no chat template; use a plain prompt")
        return self.chat.encode(messages, add_generation_prompt, **template_vars)

    @property
    def thinks(self) -> bool:
        """Its replies may begin with a <think> block (bot/thinking.py keeps it apart): its
        tokenizer has <think> and </think> as tokens (Qwen3, SmolLM3, DeepSeek-R1 distills) or
        its template writes them."""
        tags = ("<think>", "</think>")
        template = self.manifest.tokenizer.chat_template or ""
        return all(self.tokenizer.token_to_id(t) is not None for t in tags) or all(
            t in template for t in tags
        )

    def thinking_vars(self, mode: str) -> dict[str, Any]:
        """The template variable that turns thinking on or off (`mode` "on"/"off"), for a
        template that reads one; nothing for "auto" (the template's own default)."""
        template = self.manifest.tokenizer.chat_template or ""
        if mode == "auto" or "enable_thinking" not in template:
            return {}
        return {"enable_thinking": mode == "on"}

    def encode_chat(self, user_text: str) -> list[int]:
        """Token ids of one user turn rendered with the chat template (the template adds BOS)."""
        return self.encode_prompt([{"role": "user", "content": user_text}])[1]


def resolve_version(ref: str | Path | None, registry: str | Path | None = None) -> Path:
    """The version folder of `ref` (NAME, NAME@N, a folder; None: the active version)."""
    reg = Registry(registry if registry is not None else default_registry())
    try:
        if ref is None or str(ref) == "":
            info = reg.active()
            if info is None:
                raise ModelLoadError(NO_ACTIVE.format(registry=reg.root))
            return info.path
        return reg.resolve(ref).path
    except RegistryError as exc:
        raise ModelLoadError(str(exc)) from None


def load_model(ref: str | Path | None, registry: str | Path | None = None) -> LoadedModel:
    """Resolve and read a version; ModelLoadError (one line) on anything missing or invalid."""
    path = resolve_version(ref, registry)
    try:
        manifest = Manifest.load(path)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
    if manifest.flavour != "fused" or manifest.graph.kv_layout != "shared-buffer":
        raise ModelLoadError(
            f"{path}: the engine runs the fused flavour (this version is {manifest.flavour}); "
            "re-export with --flavour fused"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path / manifest.tokenizer.file))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise ModelLoadError(f"{path}: cannot read the tokenizer ({exc})") from None
    info = manifest.tokenizer
    chat = ChatEncoder(
        tokenizer,
        info.chat_template or None,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        unk_token=info.unk_token,
        pad_token=info.pad_token,
    )
    return LoadedModel(path=path, manifest=manifest, tokenizer=tokenizer, chat=chat)
