"""docs/deployment.md against the code: the compose file, the systemd units and their settings,
the commands it tells operators to run (no Docker here: the files are checked, not run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bot.config import BotConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
SETTINGS = {name.upper() for name in BotConfig.model_fields} | {"DISCORD_TOKEN"}
POSTGRES_IMAGE = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC, re.M | re.S)


def test_compose_parses_and_runs_our_image_with_our_settings():
    [text] = blocks("yaml")
    compose = yaml.safe_load(text)
    services = compose["services"]
    ours = {name: s for name, s in services.items() if "build" in s}
    assert {"shard-0", "shard-1", "worker"} <= set(ours)
    for name, service in ours.items():
        assert service["build"] == "." and (ROOT / "Dockerfile").exists()
        unknown = set(service["environment"]) - SETTINGS
        assert not unknown, f"{name}: {unknown} are not settings of bot.config.BotConfig"
        assert service["command"] in ("python -m bot run", "python -m bot worker")
        for volume in service["volumes"]:  # host folders the operator fills
            assert not volume.startswith("/"), volume
    assert {s["environment"]["SHARD_IDS"] for n, s in ours.items() if n.startswith("shard")} == {
        "0",
        "1",
    }
    assert set(services["postgres"]["environment"]) <= POSTGRES_IMAGE


def test_the_image_installs_what_the_distributed_layout_needs():
    """The compose file builds the repository's Dockerfile: asyncpg and redis must be in it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = re.search(r'pip install -e "?\.\[([a-z,]+)\]"?', dockerfile)
    assert install and {"postgres", "redis"} <= set(install.group(1).split(","))
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not [line for line in instructions if "torch" in line or "train" in line]


def test_systemd_units_and_env_file_use_our_settings_and_commands():
    units = "\n".join(blocks("ini"))
    names = set(re.findall(r"^([A-Z_]+)=", units, re.M))
    names |= set(re.findall(r"^Environment=([A-Z_]+)=", units, re.M))
    assert names <= SETTINGS, names - SETTINGS
    starts = re.findall(r"^ExecStart=\S+ -m (.+)$", units, re.M)
    assert sorted(starts) == ["bot run", "bot worker"]


def named_commands() -> list[str]:
    """`python -m bot run`, `python -m bot db copy`, ...: every command the doc names (a
    subcommand's own subcommand only for `db`; what follows otherwise is prose or arguments)."""
    found = set()
    for module, words in re.findall(r"python -m (bot|export|models) ([a-z-]+(?: [a-z-]+)?)", DOC):
        parts = words.split()
        found.add(" ".join([module, *parts[: 2 if parts[0] == "db" else 1]]))
    return sorted(found)


@pytest.mark.parametrize("command", named_commands())
def test_every_command_the_doc_names_exists(command: str):
    done = subprocess.run(
        [sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
