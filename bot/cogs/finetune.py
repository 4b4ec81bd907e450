"""/model finetune and /model jobs (declared in admin.py's /model group), the job's progress
message and its buttons (Cancel; Use it, Discard): a thin adapter over bot/finetune."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.checks import NotAllowed, is_admin
from bot.finetune import jobs
from bot.finetune.errors import FinetuneError
from bot.finetune.progress import describe, summary_line
from bot.finetune.runner import JobRunner
from bot.finetune.start import DEFAULT_STEPS, new_job
from bot.storage.models import FinetuneJob, JobStatus
from export.registry import Registry, RegistryError

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)
NONE = discord.AllowedMentions.none()
ADMINS_ONLY = "Fine-tuning is for server administrators only."
CANCEL, USE, DISCARD = "cancel", "use", "discard"
LOOK = {
    CANCEL: ("Cancel", discord.ButtonStyle.danger),
    USE: ("Use it", discord.ButtonStyle.success),
    DISCARD: ("Discard", discord.ButtonStyle.secondary),
}
_CHANNEL_ID = re.compile(r"[0-9]{15,20}")


def server_admin(user: discord.abc.User, admin_ids: list[int]) -> bool:
    """ADMIN_USER_IDS, or the server-wide Administrator permission (not a channel's)."""
    return is_admin(user, admin_ids)


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"ft:(?P<action>cancel|use|discard):(?P<job>[0-9]{1,20})",
):
    """A button under a job's progress message; persistent: the custom id names the job."""

    def __init__(self, action: str, job_id: int) -> None:
        label, style = LOOK[action]
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"ft:{action}:{job_id}")
        )
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog("Finetune")  # type: ignore[attr-defined]
        if cog is None:
            await interaction.response.send_message("Fine-tuning is not loaded.", ephemeral=True)
            return
        await cog.press(interaction, self.action, self.job_id)


def job_view(job: FinetuneJob) -> discord.ui.View | None:
    """Cancel while it runs; Use it and Discard once a version is published."""
    actions: tuple[str, ...] = ()
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        actions = (CANCEL,)
    elif job.status == JobStatus.FINISHED and job.result_ref:
        f = job.figures or {}
        actions = () if f.get("discarded") or f.get("used") else (USE, DISCARD)
    if not actions:
        return None
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(JobButton(action, job.id))
    return view


class Finetune(commands.Cog):
    """Fine-tuning jobs started from Discord; one at a time, in child processes."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        s = bot.settings
        self.registry = Registry(s.model_registry)
        self.runner = JobRunner(bot.db, s.data_dir, s.model_registry, on_update=self.show)
        self.task: asyncio.Task | None = None
        self._plans: dict[int, str] = {}
        self._last_edit: dict[int, tuple[float, str, str]] = {}
        self._reported = False
        self.remote: Any = None  # with REDIS_URL: a Redis client; jobs go to `bot trainer`
        self._listener: asyncio.Task | None = None

    async def cog_load(self) -> None:
        if self.bot.settings.redis_url:
            from bot.backends.redis_backend import connect
            from bot.finetune.remote import FinetuneKeys

            self.remote = connect(self.bot.settings.redis_url)
            self.keys = FinetuneKeys(self.bot.settings.redis_prefix)
            self._listener = asyncio.create_task(self._listen(), name="finetune-events")

    async def _listen(self) -> None:
        """With Redis: the trainer's updates -> the progress messages of this process's servers."""
        from redis.exceptions import RedisError

        from bot.finetune.remote import parse_event

        last = "$"
        while True:
            try:
                reply = await self.remote.xread({self.keys.events: last}, block=1000)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        job_id = parse_event(fields)
                        job = None if job_id is None else await jobs.get(self.bot.db, job_id)
                        if job is not None and self.bot.get_guild(job.guild_id) is not None:
                            await self.show(job)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("fine-tuning updates from Redis: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("cannot show a fine-tuning update")

    async def cog_unload(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self.remote is not None:
            await self.remote.aclose()
        if self.runner.cancel() and self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.task), 30)

    # -- what a restart finds --
    @commands.Cog.listener()
    async def on_ready(self) -> None:
        if self._reported or self.remote is not None:  # with Redis: the trainer's job
            return
        self._reported = True
        for job in await jobs.fail_orphans(self.bot.db):
            log.warning("job %s was left %s by an earlier run: marked failed", job.id, job.phase)
            await self.show(job, force=True)

    # -- the progress message --
    async def show(self, job: FinetuneJob, *, force: bool = False) -> None:
        """Edit the job's progress message (at most every EDIT_INTERVAL_S while it trains; at
        once when the phase or the status changes); post it when it has none."""
        if job.channel_id is None:
            return
        now = time.monotonic()
        last = self._last_edit.get(job.id)
        key = (str(job.status), job.phase)
        if (
            not force
            and last is not None
            and (last[1], last[2]) == key
            and now - last[0] < self.bot.settings.edit_interval_s
        ):
            return
        self._last_edit[job.id] = (now, *key)
        channel = self.bot.get_channel(job.channel_id) or self.bot.get_partial_messageable(
            job.channel_id
        )
        text, view = describe(job, self._plans.get(job.id)), job_view(job)
        try:
            if job.progress_message_id is None:
                message = await channel.send(text, view=view, allowed_mentions=NONE)  # type: ignore[union-attr]
                await jobs.update(self.bot.db, job.id, progress_message_id=message.id)
                job.progress_message_id = message.id
            else:
                partial = channel.get_partial_message(job.progress_message_id)  # type: ignore[union-attr]
                await partial.edit(content=text, view=view, allowed_mentions=NONE)
        except discord.HTTPException as exc:
            log.info("cannot show job %s in channel %s: %s", job.id, job.channel_id, exc)

    # -- commands (/model finetune and /model jobs in bot/cogs/admin.py call these) --
    async def finetune(
        self,
        interaction: discord.Interaction,
        steps: int = DEFAULT_STEPS,
        channels: str | None = None,
        method: Literal["auto", "lora", "full"] = "auto",
    ) -> None:
        if interaction.guild is None or interaction.channel_id is None:
            raise app_commands.AppCommandError("Fine-tuning works in a server's channel.")
        if not server_admin(interaction.user, self.bot.settings.admin_user_ids):
            raise NotAllowed(ADMINS_ONLY)
        chosen = self._channels(interaction.guild, channels)
        try:
            job, plan = await new_job(
                self.bot.db,
                registry=self.registry.root,
                data_dir=self.bot.settings.data_dir,
                base_ref=self.bot.backend.model.ref,
                guild_id=interaction.guild.id,
                channel_id=interaction.channel_id,
                user_id=interaction.user.id,
                steps=steps,
                channels=chosen,
                method=None if method == "auto" else method,
            )
        except (FinetuneError, RegistryError) as exc:
            await interaction.response.send_message(f"Not started: {exc}", ephemeral=True)
            return
        self._plans[job.id] = plan.describe()
        await self.bot.chat.audit(
            interaction.user.id, "model.finetune", f"job {job.id}: {plan.describe()}"
        )
        await interaction.response.send_message(
            f"Started fine-tuning job {job.id}: {plan.describe()}, {steps} steps.",
            ephemeral=True,
        )
        if self.remote is not None:
            from bot.finetune.remote import submit

            await self.show(job, force=True)  # the message first: the trainer's updates edit it
            await submit(self.remote, self.keys, job.id, plan.base_ref, plan.method)
            return
        # the runner's first update posts the progress message (with Cancel, once it can)
        self.task = asyncio.create_task(self.runner.run(job, plan), name=f"finetune-{job.id}")

    @staticmethod
    def _channels(guild: discord.Guild, given: str | None) -> list[int]:
        """Channel mentions or ids of this server; anything else is refused."""
        if not given:
            return []
        ids = [int(i) for i in _CHANNEL_ID.findall(given)]
        unknown = [i for i in ids if guild.get_channel_or_thread(i) is None]
        if not ids or unknown:
            raise app_commands.AppCommandError(
                "channels: give channels of this server (#mentions or ids)"
            )
        return ids

    async def list_jobs(self, interaction: discord.Interaction) -> None:
        if not server_admin(interaction.user, self.bot.settings.admin_user_ids):
            raise NotAllowed(ADMINS_ONLY)
        rows = await jobs.recent(self.bot.db, interaction.guild_id)
        text = "\n".join(summary_line(j) for j in rows) or "No fine-tuning jobs yet."
        await interaction.response.send_message(
            f"```\n{text[:1900]}\n```", ephemeral=True, allowed_mentions=NONE
        )

    # -- buttons --
    async def press(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        if not server_admin(interaction.user, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(ADMINS_ONLY, ephemeral=True)
            return
        job = await jobs.get(self.bot.db, job_id)
        if job is None or (
            interaction.guild_id is not None and job.guild_id != interaction.guild_id
        ):
            await interaction.response.send_message("That job is not there.", ephemeral=True)
            return
        if action == CANCEL and self.remote is not None and job.status in jobs.ACTIVE:
            from bot.finetune.remote import request_cancel

            await request_cancel(self.remote, self.keys, job_id)
            await interaction.response.send_message(f"Cancelling job {job_id}…", ephemeral=True)
            return
        if action == CANCEL:
            if self.runner.job_id != job_id or not self.runner.cancel():
                await interaction.response.send_message("That job is not running.", ephemeral=True)
                return
            await self.bot.chat.audit(interaction.user.id, "model.finetune.cancel", f"job {job_id}")
            await interaction.response.send_message(f"Cancelling job {job_id}…", ephemeral=True)
            return
        f = job.figures or {}
        if job.status != JobStatus.FINISHED or not job.result_ref or f.get("discarded"):
            await interaction.response.send_message("That version is not there.", ephemeral=True)
            return
        if action == USE:
            await interaction.response.defer(ephemeral=True, thinking=True)
            admin = self.bot.get_cog("Admin")
            try:
                text = await admin._activate(job.result_ref, interaction.user.id, "model.use")  # type: ignore[union-attr]
            except Exception as exc:  # the swap refused it; /model use says the same
                await interaction.edit_original_response(content=f"Not switched: {exc}")
                return
            job = await jobs.update(self.bot.db, job_id, figures={"used": True})
            await interaction.edit_original_response(content=text)
        else:
            if job.result_ref == self.bot.backend.model.ref:
                await interaction.response.send_message(
                    f"{job.result_ref} is running; /model rollback first.", ephemeral=True
                )
                return
            try:
                await asyncio.to_thread(self.registry.delete, job.result_ref)
            except RegistryError as exc:
                await interaction.response.send_message(f"Not discarded: {exc}", ephemeral=True)
                return
            await self.bot.chat.audit(
                interaction.user.id, "model.finetune.discard", f"{job.result_ref}"
            )
            job = await jobs.update(self.bot.db, job_id, figures={"discarded": True})
            await interaction.response.send_message(f"Discarded {job.result_ref}.", ephemeral=True)
        await self.show(job, force=True)


async def setup(bot: ChatBot) -> None:
    cog = Finetune(bot)
    await bot.add_cog(cog)
    bot.add_dynamic_items(JobButton)
