"""Command line of the bot: `python -m bot start|run|chat|db|generate|bench|worker|...`."""

from __future__ import annotations

import argparse
import importlib
import sys

from bot.config import ConfigError

# subcommand -> (module, help). Each module defines add_arguments(parser) and main(args) -> int;
# modules are imported only for the subcommand that runs, so `db` never loads ONNX Runtime.
COMMANDS: dict[str, tuple[str, str]] = {
    "start": ("bot.cli", "set up and run: on Discord with a token, else the console chat"),
    "run": ("bot.cli", "connect to Discord (needs DISCORD_TOKEN)"),
    "chat": ("bot.console", "chat with the model in this terminal"),
    "db": ("bot.storage.cli", "database migrations: upgrade, current, downgrade"),
    "generate": ("bot.engine.cli", "generate text with a model version"),
    "bench": ("bot.engine.bench", "measure time to first token and tokens/s"),
    "worker": ("bot.worker", "serve generation requests from Redis (REDIS_URL)"),
    "finetune": ("bot.finetune.cli", "fine-tune the model on a server's stored conversations"),
    "trainer": ("bot.finetune.trainer", "run fine-tuning jobs sent through Redis (REDIS_URL)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        adder = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
        adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the chosen subcommand's parser, so help for one does not import all the others.
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(
            prog=f"python -m bot {name}", description=COMMANDS[name][1]
        )
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(parser)
        args = parser.parse_args(argv[1:])
        runner = getattr(module, f"{name}_main", None) or module.main
        try:
            return int(runner(args) or 0)
        except ConfigError as exc:  # a bad setting, wherever a command reads them: one line
            print(f"error: {exc}", file=sys.stderr)
            return 2
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
