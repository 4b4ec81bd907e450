"""One export: load a checkpoint, build and save the graph, verify it, publish it as a version."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.manifest import (
    PRECISIONS,
    Architecture,
    FileEntry,
    Finetune,
    Gate,
    GraphInfo,
    Manifest,
    Parity,
    SourceInfo,
    TensorSpec,
    TokenizerInfo,
    file_entries,
)
from export.registry import Registry, VersionInfo, validate_name

FLAVOURS = ("fused", "reference")
DEFAULT_FLAVOUR = "fused"
DEFAULT_PRECISION = "fp32"
DEFAULT_MAX_CONTEXT = 2048  # capped at the model's max_position_embeddings
# end-of-turn tokens that stop generation when the chat template writes them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
    "max_length",
)


class ExportError(Exception):
    """A bad export request (option combination, unavailable flavour); one line for users."""


class GateError(Exception):
    """The quality gate failed for an export that required it (ensure-default); not published."""

    def __init__(self, message: str, figures: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.figures = figures


class ParityError(Exception):
    """The graph failed verification and --force was not given; carries the figures."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    name: str
    precision: str = DEFAULT_PRECISION
    flavour: str = DEFAULT_FLAVOUR
    max_context: int | None = None
    force: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    require_gate: bool = False  # publish only if the quality gate passes (export.gate)
    base: Path | None = None  # the base checkpoint of a LoRA adapter (else its config's)
    chat_template: Path | None = None  # a Jinja chat template file, instead of the checkpoint's
    finetune: dict[str, Any] | None = None  # export.manifest.Finetune's fields (bot/finetune)
    # the build without torch: a .gguf read with numpy (export.gguf_source), verified against the
    # reference graph of the same weights (ORT) instead of the PyTorch model
    torch_free: bool = False
    generation: Mapping[str, Any] | None = None  # merged over the checkpoint's generation config


def check_request(req: ExportRequest) -> None:
    """Refuse bad requests before any work is done."""
    validate_name(req.name)
    if req.precision not in PRECISIONS:
        raise ExportError(
            f"unknown precision {req.precision!r} (choose from {', '.join(PRECISIONS)})"
        )
    if req.flavour not in FLAVOURS:
        raise ExportError(f"unknown flavour {req.flavour!r} (choose from {', '.join(FLAVOURS)})")
    if req.flavour == "reference" and req.precision != "fp32":
        raise ExportError(
            "the reference flavour is fp32 only; use --flavour fused for other precisions"
        )
    if req.max_context is not None and req.max_context < 1:
        raise ExportError(f"--max-context must be positive, got {req.max_context}")
    if not Path(req.checkpoint).expanduser().exists():
        raise ExportError(f"{req.checkpoint}: no such checkpoint folder or file")
    if req.base is not None and not Path(req.base).expanduser().exists():
        raise ExportError(f"{req.base}: no such base checkpoint folder or file")
    if req.chat_template is not None and not Path(req.chat_template).expanduser().is_file():
        raise ExportError(f"{req.chat_template}: no such chat template file")
    if req.torch_free and Path(req.checkpoint).suffix.lower() != ".gguf":
        raise ExportError(f"{req.checkpoint}: the build without torch reads .gguf files only")


class _Stages:
    """A tqdm bar over the export stages, and the seconds each one took."""

    NAMES = ("load", "build", "save", "verify", "gate")

    def __init__(self, enabled: bool | None) -> None:
        from tqdm import tqdm

        disable = None if enabled is None else not enabled  # None: only on a terminal
        self.bar = tqdm(
            total=len(self.NAMES), desc="export", unit="stage", disable=disable, file=sys.stderr
        )
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def export_checkpoint(req: ExportRequest, registry: Registry) -> tuple[VersionInfo, Manifest]:
    """Export req.checkpoint and publish it as the next version of req.name."""
    check_request(req)
    stages = _Stages(req.progress)
    stage = stages.stage
    try:
        with stage("load"):
            src = _load(req)
            _set_chat_template(src, req)
        max_context = _max_context(req, src.config)

        def build(folder: Path) -> None:
            from export.onnx_graph import GRAPH_FILE, save_model, streamed_weights

            # the weights go from the checkpoint's files to the graph's data file one at a time
            with stage("build"), streamed_weights(folder), _tensor_bar(src, "weights", req):
                model = _build_graph(src, req, max_context)
                graph_info = _graph_info(model, req, max_context)
            with stage("save"):
                save_model(model, folder / GRAPH_FILE)
                del model
                src.tokenizer.save(folder)
            with stage("verify"), _tensor_bar(src, "verify", req):
                figures = _verify(folder, src, req)
            forced = not figures["passed"]
            if forced and not req.force:
                from export.verify import describe_failure

                raise ParityError(
                    describe_failure(figures) + "; not published (--force publishes anyway)",
                    figures,
                )
            with stage("gate"), streamed_weights(folder):
                gate = _gate(folder, src, req)
            if req.require_gate and not (gate and gate["passed"]):
                raise GateError(_gate_failure(gate), gate)
            manifest = _manifest(src, req, folder, graph_info, figures, max_context, forced)
            manifest.gate = Gate(**gate) if gate else None
            manifest.timings = dict(stages.timings)
            manifest.finetune = Finetune(**req.finetune) if req.finetune else None
            manifest.write(folder)

        info = registry.publish(build, req.name)
    finally:
        stages.close()
    return info, info.manifest()


# a conversation every chat template must render
_SAMPLE_CHAT = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
]


def _set_chat_template(src: Any, req: ExportRequest) -> None:
    """Use req.chat_template's file (checked to render) when given; say at once, on stderr, that
    a model without any template is prompted with a plain transcript, and how to give one."""
    import dataclasses

    from models.errors import ModelError

    if req.chat_template is not None:
        path = Path(req.chat_template).expanduser()
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: unreadable chat template ({exc})") from None
        tokenizer = dataclasses.replace(src.tokenizer, chat_template=template)
        try:
            tokenizer.apply_chat_template(_SAMPLE_CHAT)
        except ModelError as exc:
            raise ExportError(f"{path}: the chat template does not render ({exc})") from None
        src.tokenizer = tokenizer
    elif src.tokenizer.chat_template is None:
        print(
            f"note: {req.checkpoint} has no chat template (tokenizer_config.json, "
            "chat_template.jinja or GGUF metadata): the bot will prompt it with a plain "
            "transcript; give one with --chat-template FILE",
            file=sys.stderr,
        )


@contextmanager
def _tensor_bar(src: Any, desc: str, req: ExportRequest) -> Iterator[None]:
    """A tqdm bar counting the checkpoint tensors read (each is read from its file when asked
    for), shown like the stage bar (req.progress; None: only on a terminal)."""
    from tqdm import tqdm

    from models.lazy_tensors import LazyTensors

    tensors = src.tensors
    disable = None if req.progress is None else not req.progress
    with tqdm(
        total=len(tensors), desc=desc, unit="tensor", disable=disable, file=sys.stderr
    ) as bar:

        def read(name: str) -> Any:
            value = tensors[name]
            bar.update(1)
            return value

        src.tensors = LazyTensors(tensors, read)
        try:
            yield
        finally:
            src.tensors = tensors


def _load(req: ExportRequest) -> Any:
    """The ExportSource: torch-free from a GGUF file, else through models.checkpoint (torch)."""
    if req.torch_free:
        from export.gguf_source import load_gguf_source

        return load_gguf_source(req.checkpoint, req.generation)
    from export.weights import load_export_source
    from models.errors import require_torch

    require_torch("exporting a checkpoint and verifying it against PyTorch")
    src = load_export_source(req.checkpoint, req.base)
    src.generation_config |= dict(req.generation or {})
    return src


def _max_context(req: ExportRequest, cfg: Any) -> int:
    limit = cfg.max_position_embeddings
    if req.max_context is None:
        return min(DEFAULT_MAX_CONTEXT, limit)
    if req.max_context > limit:
        raise ExportError(f"--max-context {req.max_context} exceeds the model's {limit} positions")
    return req.max_context


def _build_graph(src: Any, req: ExportRequest, max_context: int) -> Any:
    if req.flavour == "reference":
        from export.graph_reference import build_reference_graph

        return build_reference_graph(src)
    from export.graph_fused import build_fused_graph

    try:
        return build_fused_graph(src, precision=req.precision, max_context=max_context)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _verify(folder: Path, src: Any, req: ExportRequest) -> dict[str, Any]:
    from export.onnx_graph import GRAPH_FILE
    from export.verify import verify

    against = "reference" if req.torch_free else "torch"
    return verify(
        folder / GRAPH_FILE, src, flavour=req.flavour, precision=req.precision, against=against
    )


def _gate(folder: Path, src: Any, req: ExportRequest) -> dict[str, Any] | None:
    """The quality gate's figures (fused graphs with a chat template), else None."""
    if req.flavour != "fused":
        return None
    from export.gate import run_gate

    return run_gate(folder / "model.onnx", src, req.precision, _tokenizer_info(src).stop_token_ids)


def _gate_failure(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return (
            "quality gate not run (no chat template, or a max context too short for its "
            "prompts); not published"
        )
    return Gate(**gate).summary() + "; not published"


# ---- the manifest ------------------------------------------------------------------------------


def _tensor_specs(values: Any) -> list[TensorSpec]:
    from onnx import helper

    specs = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        specs.append(TensorSpec(name=v.name, dtype=dtype, shape=dims))
    return specs


def _graph_info(model: Any, req: ExportRequest, max_context: int) -> GraphInfo:
    inputs = _tensor_specs(model.graph.input)
    kv = next(s for s in inputs if s.name.startswith("past_key_values."))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return GraphInfo(
        flavour=req.flavour,
        opset=opset,
        domains=sorted(o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")),
        inputs=inputs,
        outputs=_tensor_specs(model.graph.output),
        kv_dtype=kv.dtype,
        kv_layout="shared-buffer" if req.flavour == "fused" else "concat",
        max_context=max_context,
        logits="last" if req.flavour == "fused" else "all",
    )


def _tokenizer_info(src: Any) -> TokenizerInfo:
    bundle, cfg = src.tokenizer, src.config
    template = bundle.chat_template
    specials = {tok: bundle.token_id(tok) for tok in bundle.special_tokens}
    stops: list[str] = [bundle.eos_token] if bundle.eos_token else []
    stops += [t for t in END_OF_TURN_TOKENS if template and t in template and t in specials]
    for ids in (cfg.eos_token_id, src.generation_config.get("eos_token_id")):
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and (text := bundle.tokenizer.id_to_token(i)) is not None:
                stops.append(text)
    stops = list(dict.fromkeys(stops))
    stop_ids = sorted({i for t in stops if (i := bundle.token_id(t)) is not None})
    return TokenizerInfo(
        chat_template_file="chat_template.jinja" if template is not None else None,
        chat_template=template,
        bos_token=bundle.bos_token,
        eos_token=bundle.eos_token,
        pad_token=bundle.pad_token,
        unk_token=bundle.unk_token,
        bos_token_id=bundle.token_id(bundle.bos_token),
        eos_token_id=bundle.token_id(bundle.eos_token),
        pad_token_id=bundle.token_id(bundle.pad_token),
        special_tokens={k: v for k, v in specials.items() if v is not None},
        stop_tokens=stops,
        stop_token_ids=stop_ids,
    )


def _source_info(src: Any) -> SourceInfo:
    base = src.source if src.kind == "hf" else src.source.parent
    files = [
        FileEntry(name=Path(os.path.relpath(f.path, base)).as_posix(), size=f.size, sha256=f.sha256)
        for f in src.source_files
    ]
    return SourceInfo(path=str(src.source.resolve()), kind=src.kind, files=files)


def _manifest(
    src: Any,
    req: ExportRequest,
    folder: Path,
    graph: GraphInfo,
    figures: dict[str, Any],
    max_context: int,
    forced: bool,
) -> Manifest:
    import dataclasses

    import onnxruntime

    arch = {
        k: v for k, v in dataclasses.asdict(src.config).items() if k in Architecture.model_fields
    }
    generation = {
        k: src.generation_config[k] for k in GENERATION_KEYS if k in src.generation_config
    }
    return Manifest(
        name=req.name,
        version=0,  # the registry sets the number when it renames the folder into place
        source=_source_info(src),
        architecture=Architecture(**arch),
        precision=req.precision,
        flavour=req.flavour,
        max_context=max_context,
        opset=graph.opset,
        onnxruntime_version=onnxruntime.__version__,
        graph=graph,
        tokenizer=_tokenizer_info(src),
        generation=generation,
        parity=Parity(**figures),
        forced=forced,
        files=file_entries(folder),
    )
