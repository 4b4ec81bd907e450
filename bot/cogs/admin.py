"""Admin slash commands: /model (info, list, use, rollback, export), /channel autoreply, /stats."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.checks import admin_only
from bot.errors import quoted
from bot.finetune.start import DEFAULT_STEPS, MAX_STEPS
from export.manifest import Precision
from export.registry import Registry, RegistryError

if TYPE_CHECKING:
    from bot.client import ChatBot
    from bot.cogs.finetune import Finetune

log = logging.getLogger(__name__)

NONE = discord.AllowedMentions.none()
PROGRESS_LINES = 12  # lines of export output shown while it runs
_SPLIT = re.compile(r"[\r\n]+")


def resolve_checkpoint(given: str, allowed_dir: Path) -> Path:
    """The checkpoint path, which must exist under `allowed_dir` (relative paths start there)."""
    root = allowed_dir.expanduser().resolve()
    path = Path(given).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise RegistryError(f"checkpoints must be under {root}")
    if not path.exists():
        raise RegistryError(f"no checkpoint at {path}")
    return path


def last_json_line(lines: list[str]) -> dict[str, Any] | None:
    """The last line of output that is a JSON object (the export CLI's --json result)."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data
    return None


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] if days else []
    return " ".join([*parts, f"{hours}h", f"{minutes}m", f"{secs}s"])


class Admin(commands.Cog):
    """Model versions from the registry, auto-reply channels and bot statistics."""

    model_group = app_commands.Group(name="model", description="The model version the bot runs")
    channel_group = app_commands.Group(
        name="channel",
        description="Channel behaviour",
        default_permissions=discord.Permissions(administrator=True),
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.registry = Registry(bot.settings.model_registry)
        self._export_lock = asyncio.Lock()

    async def _activate(self, ref: str, actor_id: int, action: str) -> str:
        """Swap the backend to a registry version (NAME or NAME@N, its files checked against the
        manifest first; in-flight replies finish on the old one), then record it as the
        registry's active version and in the audit log, which says what really happened."""
        before = self.bot.backend.model.ref
        try:
            info = await asyncio.to_thread(self.registry.checked, ref)
            await self.bot.backend.swap(info.path)  # with Redis: every shard and worker follows
        except Exception as exc:
            await self.bot.chat.audit(
                actor_id, action, f"refused {quoted(ref)}: {exc}; kept {before}"
            )
            raise
        await asyncio.to_thread(self.registry.use, info.ref)
        await self.bot.chat.audit(actor_id, action, f"{before} -> {info.ref}")
        return f"Now running **{info.ref}** (was {before})."

    # -- /model --
    @model_group.command(name="info", description="The model version the bot runs")
    async def model_info(self, interaction: discord.Interaction) -> None:
        backend = self.bot.backend
        m = backend.model.manifest
        engine = getattr(backend, "engine", None)  # None: generation by Redis workers
        if engine is not None:
            session = engine.session_info
            provider = session.provider + (
                f" ({session.threads} threads)" if session.threads else ""
            )
            if session.fallback_reason:
                provider += f"; CUDA unavailable: {session.fallback_reason}"
        else:
            stats = await backend.stats()
            provider = f"{len(stats.workers)} worker(s) through Redis ({stats.provider})"
        speed = self.bot.recent_speed()
        lines = [
            f"model: {m.name}@{m.version}",
            f"architecture: {m.architecture.family}",
            f"precision: {m.precision} ({m.flavour} graph)",
            f"context: {m.max_context} tokens",
            f"created: {m.created_at:%Y-%m-%d %H:%M} UTC",
            f"provider: {provider}",
            m.gate.summary() if m.gate else "quality gate: not run",
            f"recent speed: {speed:.1f} tokens/s" if speed else "recent speed: no replies yet",
        ]
        await interaction.response.send_message("```\n" + "\n".join(lines) + "\n```")

    @model_group.command(name="list", description="Versions in the model registry")
    @admin_only()
    async def model_list(self, interaction: discord.Interaction) -> None:
        versions = await asyncio.to_thread(self.registry.versions)
        running = self.bot.backend.model.ref
        if not versions:
            text = f"The registry {self.registry.root} has no versions."
        else:
            rows = [
                v.ref
                + (" (active)" if v.active else "")
                + (" (running)" if v.ref == running else "")
                for v in versions
            ]
            text = "```\n" + "\n".join(rows[-40:]) + "\n```"
        await interaction.response.send_message(text, ephemeral=True)

    @model_group.command(name="use", description="Switch to another model version")
    @app_commands.describe(version="NAME or NAME@N from the registry")
    @admin_only()
    async def model_use(self, interaction: discord.Interaction, version: str) -> None:
        await asyncio.to_thread(self.registry.resolve_name, version)  # a bad name: no defer
        await interaction.response.defer(thinking=True)
        text = await self._activate(version, interaction.user.id, "model.use")
        await interaction.edit_original_response(content=text)

    @model_use.autocomplete("version")
    async def _version_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        try:
            versions = await asyncio.to_thread(self.registry.versions)
        except RegistryError:
            return []
        refs = [v.ref for v in reversed(versions) if current.lower() in v.ref.lower()]
        return [app_commands.Choice(name=ref, value=ref) for ref in refs[:25]]

    @model_group.command(name="rollback", description="Back to the previously active version")
    @admin_only()
    async def model_rollback(self, interaction: discord.Interaction) -> None:
        current = self.bot.backend.model.manifest.name
        await interaction.response.defer(thinking=True)
        previous = await asyncio.to_thread(self.registry.active)
        target = await asyncio.to_thread(self.registry.rollback, current)
        try:
            text = await self._activate(target.ref, interaction.user.id, "model.rollback")
        except BaseException:
            if previous is not None:  # keep the registry pointing at what actually runs
                await asyncio.to_thread(self.registry.use, previous.ref)
            raise
        await interaction.edit_original_response(content=text)

    @model_group.command(
        name="finetune", description="Fine-tune the running model on this server's conversations"
    )
    @app_commands.describe(
        steps=f"optimizer steps (1-{MAX_STEPS})",
        channels="only these channels' conversations (#mentions), default: the whole server",
        method="auto: LoRA for large models, full fine-tuning for small ones",
    )
    @admin_only()
    async def model_finetune(
        self,
        interaction: discord.Interaction,
        steps: app_commands.Range[int, 1, MAX_STEPS] = DEFAULT_STEPS,
        channels: str | None = None,
        method: Literal["auto", "lora", "full"] = "auto",
    ) -> None:
        await self._finetune().finetune(interaction, steps, channels, method)

    @model_group.command(name="jobs", description="Fine-tuning jobs")
    @admin_only()
    async def model_jobs(self, interaction: discord.Interaction) -> None:
        await self._finetune().list_jobs(interaction)

    def _finetune(self) -> Finetune:
        # the loaded extension's cog (discord.py loads each extension as a module of its own)
        cog = self.bot.get_cog("Finetune")
        if cog is None:
            raise app_commands.AppCommandError("Fine-tuning is not loaded.")
        return cog  # type: ignore[return-value]

    @model_group.command(name="export", description="Export a checkpoint as a new model version")
    @app_commands.describe(
        checkpoint="Hugging Face folder or .gguf file under the allowed checkpoint folder",
        name="model name in the registry",
        precision="weight precision of the exported graph",
        activate="switch to the new version when it is ready",
    )
    @admin_only()
    async def model_export(
        self,
        interaction: discord.Interaction,
        checkpoint: str,
        name: app_commands.Range[str, 1, 64],
        precision: Precision = "fp32",
        activate: bool = False,
    ) -> None:
        settings = self.bot.settings
        path = resolve_checkpoint(checkpoint, settings.export_allowed_dir)
        if self._export_lock.locked():
            await interaction.response.send_message(
                "An export is already running; try again when it is done.", ephemeral=True
            )
            return
        await interaction.response.defer(thinking=True)
        async with self._export_lock:
            await self.bot.chat.audit(
                interaction.user.id, "model.export", f"{path} as {name} ({precision})"
            )
            rc, lines = await self._run_export(interaction, path, name, precision)
        result = last_json_line(lines)
        if rc != 0 or result is None:
            tail = "\n".join(lines[-PROGRESS_LINES:])[-1800:]
            await interaction.edit_original_response(
                content=f"Export failed (exit {rc}):\n```\n{tail}\n```", allowed_mentions=NONE
            )
            return
        ref = f"{result.get('name', name)}@{result.get('version')}"
        text = f"Exported **{ref}** ({precision})."
        if activate:
            text += " " + await self._activate(ref, interaction.user.id, "model.use")
        await interaction.edit_original_response(content=text)

    async def _run_export(
        self, interaction: discord.Interaction, path: Path, name: str, precision: str
    ) -> tuple[int, list[str]]:
        """Run `python -m export` and show its latest output lines while it works."""
        cmd = [sys.executable, "-m", "export", str(path), "--name", name]
        cmd += ["--precision", precision, "--registry", str(self.bot.settings.model_registry)]
        cmd.append("--json")
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        pending, last_edit = "", 0.0
        while chunk := await proc.stdout.read(4096):
            parts = _SPLIT.split(pending + chunk.decode("utf-8", "replace"))
            pending = parts.pop()
            lines += [p for p in parts if p.strip()]
            if lines and time.monotonic() - last_edit >= max(self.bot.settings.edit_interval_s, 1):
                progress = [line for line in lines if not line.lstrip().startswith("{")]
                shown = "\n".join(progress[-PROGRESS_LINES:])[-1800:]
                try:
                    await interaction.edit_original_response(
                        content=f"Exporting {name}…\n```\n{shown}\n```", allowed_mentions=NONE
                    )
                except discord.HTTPException as exc:
                    log.warning("cannot show export progress: %s", exc)
                last_edit = time.monotonic()
        if pending.strip():
            lines.append(pending)
        return await proc.wait(), lines

    # -- /channel autoreply --
    @channel_group.command(name="autoreply", description="Answer every message in this channel")
    @app_commands.describe(
        enabled="on: answer every message; off: only mentions and replies",
        threads="answer each message in a new thread of its own (keeps busy channels readable)",
    )
    @admin_only()
    async def channel_autoreply(
        self, interaction: discord.Interaction, enabled: bool, threads: bool = False
    ) -> None:
        if interaction.channel_id is None:
            raise app_commands.AppCommandError("This command only works in a channel.")
        if threads and isinstance(interaction.channel, discord.Thread | discord.DMChannel):
            raise app_commands.AppCommandError("Threads can only start in a server's text channel.")
        await self.bot.chat.set_autoreply(
            interaction.channel_id, enabled, interaction.user.id, threads=threads
        )
        if not enabled:
            state = "off: mention me to talk"
        elif threads:
            state = "on: I answer every message here, each in a new thread"
        else:
            state = "on: I answer every message here"
        await interaction.response.send_message(f"Auto-reply is {state}.", ephemeral=True)

    # -- /stats --
    @app_commands.command(name="stats", description="Queue, streams, speed, uptime and model")
    @admin_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        engine = await bot.backend.stats()
        lines = [
            f"model: {engine.model} on {engine.provider}",
            f"uptime: {format_duration(time.monotonic() - bot.started_at)}",
            f"queue: {engine.queued} waiting",
            f"streams: {engine.active} of {engine.slots} slots busy",
            f"replies in progress: {bot.active_replies}",
        ]
        if bot.settings.redis_url:  # the workers behind Redis, as their heartbeats say
            lines.append(f"workers: {len(engine.workers) or 'none alive'}")
            lines += [
                f"  {w.id}: {w.model} on {w.provider}, {w.busy} of {w.slots} slots busy, "
                f"{w.tokens_per_s:.1f} tokens/s"
                for w in engine.workers
            ]
        speed = bot.recent_speed()
        lines.append(f"recent speed: {speed:.1f} tokens/s" if speed else "recent speed: n/a")
        lines.append(f"servers: {len(bot.guilds)}")
        await interaction.response.send_message(
            "```\n" + "\n".join(lines) + "\n```", ephemeral=True
        )


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Admin(bot))
