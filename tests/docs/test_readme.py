"""The README against the code: the slash-command table, the Tour, the invite URL."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import discord
from discord import app_commands
from discord.ext import commands

import bot.cogs

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOUR_SCRIPT = (ROOT / "scripts" / "tour.sh").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text under a heading (any level), up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", README, re.M | re.S)
    assert match, f"no section {title!r} in README.md"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the Markdown tables in `text`."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    separator = [i for i, line in enumerate(lines) if set(line) <= set("|- :")]
    headers = {i - 1 for i in separator}
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for i, line in enumerate(lines)
        if i not in headers and i not in separator
    ]


def who(permissions: discord.Permissions | None) -> str:
    if permissions is None:
        return "everyone"
    if permissions.administrator:
        return "admins"
    if permissions.manage_messages:
        return "managers"
    raise AssertionError(f"no README word for default permissions {permissions}")


def cog_classes() -> Iterator[type[commands.Cog]]:
    """Every Cog class of the extensions in bot.cogs (the modules with a setup function)."""
    for info in pkgutil.iter_modules(bot.cogs.__path__):
        module = importlib.import_module(f"{bot.cogs.__name__}.{info.name}")
        if not callable(getattr(module, "setup", None)):
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, commands.Cog) and cls.__module__ == module.__name__:
                yield cls


def app_command_table() -> dict[str, str]:
    """`/name sub` -> who may use it, for every slash command the cogs register."""
    found: dict[str, str] = {}

    def walk(cmd: app_commands.Command | app_commands.Group, inherited) -> None:
        permissions = cmd.default_permissions or inherited
        if isinstance(cmd, app_commands.Group):
            for child in cmd.commands:
                walk(child, permissions)
            return
        if permissions is not None:  # Discord ignores a subcommand's defaults: we check
            assert cmd.checks, f"/{cmd.qualified_name} has no server-side permission check"
        found[f"/{cmd.qualified_name}"] = who(permissions)

    for cls in cog_classes():
        for cmd in cls.__cog_app_commands__:
            walk(cmd, None)
    return found


def test_the_command_table_lists_every_slash_command_and_who_may_use_it():
    code = app_command_table()
    assert len(code) >= 10  # the discovery found the cogs' commands
    rows = table_rows(section("Slash commands"))
    readme = {row[0].strip("`"): row[1] for row in rows}
    assert len(readme) == len(rows), "a command is listed twice"
    assert sorted(readme) == sorted(code)  # none missing, none that does not exist
    assert readme == code  # and who may use each


def tour_commands() -> list[str]:
    cells = [row[1] for row in table_rows(section("Tour"))]
    return [cmd for cell in cells for cmd in re.findall(r"`(python -m [^`]+)`", cell)]


def test_every_tour_step_is_run_by_the_tour_script_in_the_same_order():
    steps = tour_commands()
    assert len(steps) >= 10
    script = TOUR_SCRIPT.replace("\\\n", " ")
    found = [re.search(rf"(?:^|\| )tour {re.escape(cmd)}(?=\s)", script, re.M) for cmd in steps]
    assert [cmd for cmd, match in zip(steps, found, strict=True) if match is None] == []
    positions = [match.start() for match in found if match is not None]
    assert positions == sorted(positions)
    assert "tour.sh" in (ROOT / ".ci" / "run").read_text()  # and CI runs the script


def test_the_corpus_the_tour_trains_on_ships_with_the_code():
    data = [re.search(r"--data (\S+)", cmd) for cmd in tour_commands()]
    files = [m.group(1) for m in data if m and ":" not in m.group(1)]
    assert files == ["examples/corpus.txt"]
    assert len((ROOT / files[0]).read_text(encoding="utf-8")) > 8000  # two text chunks at least


def test_the_invite_url_is_the_one_the_bot_prints_without_a_token(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "BOT_CONFIG")}
    env |= {"DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    url = re.compile(r"https://discord\.com/oauth2/authorize\?\S+")
    printed = url.findall(done.stderr)
    assert len(printed) == 1 and url.findall(section("Running it on Discord")) == printed
