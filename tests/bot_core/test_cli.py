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
