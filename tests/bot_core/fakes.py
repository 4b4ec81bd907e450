"""A small scripted engine with the Engine API (docs/architecture.md), for bot-core tests only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from bot.engine import GenerationResult, PromptTooLongError, QueueFullError, SamplingParams
from bot.engine.loader import LoadedModel
from models.chat_template import render_chat

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def result(prompt_ids: list[int], text: str, reason: str, model: str) -> GenerationResult:
    ids = list(text.encode("utf-8"))
    return GenerationResult(
        token_ids=ids,
        text=text,
        finish_reason=reason,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(ids),
        ttft_ms=1.0,
        tokens_per_s=100.0,
        model=model,
    )


class ByteTokenizer:
    """One token per UTF-8 byte: token counts are easy to reason about in budget tests."""

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(ids=list(text.encode("utf-8")))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return None  # no special tokens: a byte is a token


class FakeModel:
    def __init__(
        self,
        max_context: int,
        generation: dict[str, Any],
        name: str,
        version: int,
        chat_template: str | None = CHATML,
    ):
        self.max_context = max_context
        self.tokenizer = ByteTokenizer()
        self.manifest = SimpleNamespace(
            name=name,
            version=version,
            generation=generation,
            tokenizer=SimpleNamespace(chat_template=chat_template),
        )

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_prompt(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
    ) -> tuple[str, list[int]]:
        text = self.render_chat(messages, add_generation_prompt, **template_vars)
        return text, self.encode_text(text)

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        return render_chat(
            self.manifest.tokenizer.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=None,
            eos_token="<|im_end|>",
            **template_vars,
        )

    # a thinking model as bot.engine.loader.LoadedModel decides it (by its template here)
    thinks = LoadedModel.thinks
    thinking_vars = LoadedModel.thinking_vars


class FakeStream:
    """Yields the scripted pieces with a delay between them; counts the streams running at once."""

    def __init__(
        self, engine: FakeEngine, prompt_ids: list[int], params: SamplingParams, pieces: list[str]
    ):
        self.engine, self.prompt_ids, self.params, self.pieces = engine, prompt_ids, params, pieces
        self.result: GenerationResult | None = None
        self._sent = 0
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.result is None:
            self._end("".join(self.pieces[: self._sent]), "cancelled")

    async def wait(self) -> GenerationResult:
        while self.result is None:
            await asyncio.sleep(0.001)
        return self.result

    def _end(self, text: str, reason: str) -> None:
        self.result = result(self.prompt_ids, text, reason, self.engine.model.ref)

    async def __aiter__(self):
        self.engine.active += 1
        self.engine.max_active = max(self.engine.max_active, self.engine.active)
        try:
            if self.engine.gate is not None:
                await self.engine.gate.wait()
            for piece in self.pieces:
                await asyncio.sleep(self.engine.delay_s)
                if self.cancelled:
                    return
                if self.engine.fail_after is not None and self._sent >= self.engine.fail_after:
                    raise RuntimeError("fake engine failure")
                if self.engine.cut_after is not None and self._sent >= self.engine.cut_after:
                    self._end("".join(self.pieces[: self._sent]), self.engine.cut_reason)
                    return
                self._sent += 1
                yield piece
            budget = self.params.max_new_tokens
            text = "".join(self.pieces)
            reason = "length" if len(text.encode()) >= budget else "stop"
            self._end(text, reason)
        finally:
            self.engine.active -= 1


@dataclass
class FakeEngine:
    max_context: int = 2048
    generation: dict[str, Any] = field(default_factory=dict)
    delay_s: float = 0.0
    max_queue: int = 1000
    fail_after: int | None = None
    cut_after: int | None = None  # the engine ends the stream after this many pieces...
    cut_reason: str = "timeout"  # ...with this finish reason
    gate: asyncio.Event | None = None  # streams wait for it before their first piece
    reply_text: str = "Hi there, nice to meet you."
    name: str = "fake"
    version: int = 1
    chat_template: str | None = CHATML
    closed: bool = False  # as Engine.closed: set when the bot shuts down

    def __post_init__(self) -> None:
        self.model = FakeModel(
            self.max_context, self.generation, self.name, self.version, self.chat_template
        )
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.active = 0
        self.max_active = 0

    async def submit(
        self, prompt_ids: list[int], params: SamplingParams, timeout_s: float | None = None
    ) -> FakeStream:
        if self.active >= self.max_queue:
            raise QueueFullError("queue full")
        if len(prompt_ids) > self.max_context - params.max_new_tokens:
            raise PromptTooLongError(f"prompt of {len(prompt_ids)} tokens is too long")
        self.submitted.append((prompt_ids, params))
        words = self.reply_text[: params.max_new_tokens].split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return FakeStream(self, prompt_ids, params, pieces)

    async def refresh(self) -> FakeModel:
        return self.model

    def prompt_text(self, index: int) -> str:
        return bytes(self.submitted[index][0]).decode("utf-8")


async def first_answering_second_waiting(service: Any, engine: FakeEngine) -> None:
    """Until the first message of a channel is being answered and the second one waits in the
    inbox (ChatService `service` on `engine`)."""
    for _ in range(6000):  # a minute at most; a loaded machine needs more than a second
        if engine.submitted and len(await service.pending()) == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the first reply never started with the second message waiting")
