"""`python -m bot run` without a token explains what to set and exits 2."""

from __future__ import annotations

import os
import subprocess
import sys


def test_run_without_token_exits_2_with_guidance(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env["DATA_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    for needle in ("DISCORD_TOKEN", "Message Content", "bot applications.commands", "permissions="):
        assert needle in proc.stderr


def test_db_options_are_taken_after_the_action_too(tmp_path, capsys) -> None:
    """`db copy URL --database-url X` (and `db upgrade --database-url X`): the option where
    users type it, not only before the action ("unrecognized arguments" before)."""
    from bot.__main__ import main

    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    assert main(["db", "upgrade", "--database-url", source]) == 0
    assert main(["db", "upgrade", "--database-url", target]) == 0
    assert main(["db", "copy", target, "--database-url", source]) == 0
    assert "messages: 0 rows" in capsys.readouterr().out
    assert (tmp_path / "source.db").exists() and (tmp_path / "target.db").exists()
    assert not (tmp_path / "bot.db").exists()


def test_every_command_takes_its_options_after_its_name() -> None:
    """The settings options and --log-level wherever they make sense: run as start (which
    hands them to run), worker as the other long-running processes."""
    import argparse
    import importlib

    from bot.__main__ import COMMANDS

    given = {
        "start": ["--database-url", "sqlite://", "--model", "tiny@1", "--log-level", "debug"],
        "run": ["--database-url", "sqlite://", "--model", "tiny@1", "--log-level", "debug"],
        "chat": ["--database-url", "sqlite://", "--log-level", "info"],
        "worker": ["--id", "w1", "--log-level", "warning"],
        "db": ["current", "--database-url", "sqlite://"],
    }
    for name, argv in given.items():
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser()
        (getattr(module, f"add_{name}_arguments", None) or module.add_arguments)(parser)
        args = parser.parse_args(argv)
        assert getattr(args, "database_url", "sqlite://") == "sqlite://", name
        assert getattr(args, "log_level", "X") != "X" or name == "db", name


def test_run_honours_the_settings_options_given_to_it(tmp_path) -> None:
    """`run --model X` (and `start`, which hands its options to run when a token is set) uses
    X: run used to refuse them ("unrecognized arguments") and start passed them on unread."""
    env = {**os.environ, "DISCORD_TOKEN": "not-a-real-token", "DATA_DIR": str(tmp_path)}
    env["MODEL_REGISTRY"] = str(tmp_path / "registry")
    for command in ("run", "start"):
        proc = subprocess.run(
            [sys.executable, "-m", "bot", command, "--model", "nosuch@2", "--log-level", "debug"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "no model named 'nosuch'" in proc.stderr, proc.stderr
