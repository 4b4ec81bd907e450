"""The manifest.json of a registry version (pydantic; torch-free: the bot reads it too)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(Exception):
    """A version folder whose manifest is missing, unreadable, or does not match its files."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FileEntry(_Model):
    """A file of a version folder (or of the source checkpoint): name relative to its folder."""

    name: str
    size: int
    sha256: str


class SourceInfo(_Model):
    path: str  # the checkpoint folder or .gguf file as given at export time
    kind: Literal["hf", "gguf"]
    files: list[FileEntry]  # its weight files (name relative to the folder, or the .gguf name)


class Architecture(_Model):
    """models.model.ModelConfig, minus the token ids (those are under `tokenizer`)."""

    family: Literal["llama", "gpt2"]
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool


class TensorSpec(_Model):
    name: str
    dtype: str  # numpy spelling: int64, int32, float32, float16
    shape: list[int | str]  # str: a dynamic axis


class GraphInfo(_Model):
    """How to drive the graph: file names, I/O, KV layout (docs/architecture.md)."""

    file: str = "model.onnx"
    data_file: str = "model.onnx.data"
    flavour: Literal["reference", "fused"]
    opset: int
    domains: list[str]  # operator domains beyond the default one, e.g. com.microsoft
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_dtype: Literal["float32", "float16"]
    # "concat": present = Concat(past, new), [batch, kv_heads, past+seq, head_dim] (reference);
    # "shared-buffer": past and present are one [batch, kv_heads, max_context, head_dim]
    # buffer per layer (fused)
    kv_layout: Literal["concat", "shared-buffer"]
    max_context: int
    logits: Literal["all", "last"]  # all positions [B, T, V] or the last of each row [B, V]


class TokenizerInfo(_Model):
    file: str = "tokenizer.json"
    config_file: str = "tokenizer_config.json"
    chat_template_file: str | None  # chat_template.jinja in the version folder, if any
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    special_tokens: dict[str, int]  # every special token -> id
    stop_tokens: list[str]  # eos and the template's end-of-turn tokens
    stop_token_ids: list[int]


class StepFigures(_Model):
    step: int  # 0: the prefill, 1..N: single-token steps with the cache
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float


class Parity(_Model):
    """Figures of export.verify: the graph against the PyTorch model on the same prompts."""

    passed: bool
    thresholds: dict[str, float]  # max_rel_error, min_top1_agreement
    prompts: int
    prompt_length: int
    steps: int
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float  # over every compared position of every step
    per_step: list[StepFigures]
    seconds: float


class Gate(_Model):
    """Figures of export.gate: greedy answers to fixed chat prompts against the fp32 graph's."""

    passed: bool
    prompts: int
    new_tokens: int
    answers_equal: int  # answers identical token for token (up to the first stop token)
    min_equal: int
    differing: list[int]  # indices into export.gate.PROMPTS
    example_prompt: str  # README's example question
    example_expected: str
    example_answer: str
    example_correct: bool
    seconds: float

    def summary(self) -> str:
        """One line: the verdict, answers equal to fp32's, README's example."""
        verdict = "passed" if self.passed else "FAILED"
        example = "right" if self.example_correct else "WRONG"
        return (
            f"quality gate {verdict}: {self.answers_equal}/{self.prompts} greedy answers equal "
            f"fp32's (needs {self.min_equal}); example {example}: "
            f"{self.example_answer.strip()[:60]!r}"
        )


class Finetune(_Model):
    """A version made by a fine-tuning job (bot/finetune): what it was tuned from, on what data,
    and how it compares with its base on the held-out conversations."""

    job_id: int
    base: str  # NAME@N of the version tuned
    base_checkpoint: str  # the checkpoint that version was exported from
    method: Literal["lora", "full"]
    steps: int
    perplexity_before: float  # the base, on the held-out split
    perplexity_after: float
    data: dict[str, int]  # conversations (train, held-out), turns, channels, opted-out users
    samples: list[dict[str, str]] = Field(default_factory=list)  # prompt, before, after


Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    name: str
    version: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: SourceInfo
    architecture: Architecture
    precision: Precision
    flavour: Literal["reference", "fused"]
    max_context: int
    opset: int
    onnxruntime_version: str
    graph: GraphInfo
    tokenizer: TokenizerInfo
    generation: dict[str, Any]  # defaults from generation_config.json (temperature, top_p, ...)
    parity: Parity | None
    forced: bool = False  # published although parity failed (or was skipped)
    gate: Gate | None = None  # None: not run (no chat template, or an older version)
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per export stage
    finetune: Finetune | None = None  # set for versions a fine-tuning job published
    files: list[FileEntry]  # every file of the version folder except manifest.json

    # ---- I/O -------------------------------------------------------------------------------
    def write(self, version_dir: Path) -> Path:
        """Write manifest.json atomically (temp file + os.replace)."""
        path = Path(version_dir) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, version_dir: Path) -> Manifest:
        """Parse manifest.json without checking the files; ManifestError if absent or invalid."""
        path = Path(version_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(
                f"{version_dir}: no {MANIFEST_NAME} (not a model version)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable ({exc})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"{path}: invalid manifest ({where}: {first['msg']})") from None

    @classmethod
    def load(cls, version_dir: str | Path, verify_hashes: bool = False) -> Manifest:
        """Read the manifest and check the folder's files against it (sizes; sha256 on request)."""
        manifest = cls.read(Path(version_dir))
        manifest.check_files(Path(version_dir), verify_hashes=verify_hashes)
        return manifest

    def check_files(self, version_dir: Path, verify_hashes: bool = False) -> None:
        """ManifestError naming every missing or changed file."""
        missing, changed = [], []
        for entry in self.files:
            path = version_dir / entry.name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                missing.append(entry.name)
                continue
            if size != entry.size:
                changed.append(f"{entry.name} (size {size}, expected {entry.size})")
            elif verify_hashes and sha256_file(path) != entry.sha256:
                changed.append(f"{entry.name} (sha256 differs)")
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing))
        if changed:
            problems.append("changed " + ", ".join(changed))
        if problems:
            raise ManifestError(
                f"{version_dir}: files do not match the manifest: {'; '.join(problems)}"
            )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[FileEntry]:
    """Name, size and sha256 of every file in the folder (recursively), manifest.json excluded."""
    entries = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST_NAME or path.name.startswith(f".{MANIFEST_NAME}.tmp-"):
            continue
        entries.append(FileEntry(name=name, size=path.stat().st_size, sha256=sha256_file(path)))
    return entries
