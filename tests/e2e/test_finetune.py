"""Fine-tuning from Discord, end to end on the fake Discord: /model finetune on a tiny random
model and a few stored conversations, progress edits, Cancel, a published version with its
figures, Use it while a reply streams, refusals, and what a restart finds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from bot.backends import LocalBackend
from bot.finetune.runner import job_folder
from bot.storage.db import Database
from bot.storage.models import Channel, FinetuneJob, JobStatus, Message, Role, UserPrivacy
from export.registry import Registry
from tests.e2e.helpers import Start, command, option, post_as_bot, stored
from tests.engine.fakes import Gate, Runners
from tests.fakediscord import FakeDiscord

SECRET = "zebracorn"  # words of an opted-out user: never in the training data
JOB_S = 600  # a safety net: a tiny job takes seconds alone, minutes on a busy 2-core machine


@pytest.fixture
def registry_copy(tiny_registry, tmp_path: Path) -> Path:
    """A private copy of the tiny registry (a job publishes into it)."""
    root = tmp_path / "registry"
    shutil.copytree(tiny_registry.root, root)
    return root


async def store_conversations(bot: Any, fake: FakeDiscord, opted_out: dict[str, Any]) -> None:
    """Six channels with two finished exchanges each, and one exchange of an opted-out user."""
    olga = int(opted_out["id"])
    async with bot.db.session() as s, s.begin():
        s.add(UserPrivacy(user_id=olga, opted_out=True))
        for n, cid in enumerate(fake.text_channel_ids[:6]):
            s.add(Channel(id=cid, guild_id=fake.guild_id))
            for k in range(2):
                s.add(Message(channel_id=cid, author_id=1000 + n, author_name=f"user{n}",
                              role=Role.USER, content=f"what about topic {n}.{k}?"))  # fmt: skip
                s.add(
                    Message(channel_id=cid, role=Role.ASSISTANT, content=f"topic {n}.{k} is fine")
                )
            s.add(Message(channel_id=cid, author_id=olga, author_name="olga", role=Role.USER,
                          content=f"my {SECRET} secret"))  # fmt: skip
            s.add(Message(channel_id=cid, role=Role.ASSISTANT, content=f"your {SECRET} is safe"))


def finetune(steps: int, **extra: Any) -> list[dict[str, Any]]:
    options = [option("steps", steps, 4), *(option(k, v, 3) for k, v in extra.items())]
    return [{"type": 1, "name": "finetune", "options": options}]


def progress_message(fake: FakeDiscord, channel: int) -> dict[str, Any] | None:
    return next(
        (m for m in fake.channel_messages(channel) if "Fine-tuning job" in m["content"]), None
    )


def custom_ids(message: dict[str, Any]) -> list[str]:
    rows = message.get("components") or []
    return [c["custom_id"] for row in rows for c in row.get("components", [])]


async def job_row(bot: Any, job_id: int) -> FinetuneJob:
    async with bot.db.session() as s:
        job = await s.get(FinetuneJob, job_id)
        assert job is not None
        return job


async def test_admin_tunes_publishes_and_uses_it_while_a_reply_streams(
    fake: FakeDiscord, start_bot: Start, registry_copy: Path, monkeypatch, tmp_path: Path
) -> None:
    gate = Gate("decode")
    start = LocalBackend.start.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        LocalBackend,
        "start",
        classmethod(lambda cls, ref=None, **kw: start(cls, ref, wrap_runner=Runners(gate), **kw)),
    )
    bot = await start_bot(model_registry=registry_copy)
    admin, alice, olga = (
        fake.add_user("admin", admin=True),
        fake.add_user("alice"),
        fake.add_user("olga"),
    )
    await store_conversations(bot, fake, olga)
    channel = fake.text_channel_ids[8]

    _, started = await command(fake, channel, admin, "model", finetune(2))
    assert "Started fine-tuning job 1" in started.json["data"]["content"]
    assert (
        "full fine-tuning" in started.json["data"]["content"]
    )  # the tiny model: below LoRA's size

    done = await fake.wait_until(
        lambda: (m := progress_message(fake, channel)) and "Published" in m["content"] and m, JOB_S
    )
    edits = [
        r.json.get("content", "") for r in fake.find("PATCH", f"/channels/{channel}/messages/")
    ]
    assert any(re.search(r"step [12]/2, loss [0-9.]+, elapsed", e) for e in edits), edits
    assert "held-out perplexity" in done["content"] and "old:" in done["content"]
    assert custom_ids(done) == ["ft:use:1", "ft:discard:1"]

    job = await job_row(bot, 1)
    assert job.status == JobStatus.FINISHED and job.result_ref == "tiny@2"
    manifest = Registry(registry_copy).resolve_name("tiny@2").manifest()
    tuned = manifest.finetune
    assert tuned is not None and tuned.base == "tiny@1" and tuned.method == "full"
    assert tuned.perplexity_before > 0 and tuned.perplexity_after > 0
    assert tuned.perplexity_before == pytest.approx(job.figures["perplexity_before"])
    assert tuned.data["conversations"] == 6 and tuned.data["held_out"] >= 1
    assert manifest.gate is not None  # exported through the quality gate
    assert Path(tuned.base_checkpoint).is_relative_to(tmp_path / "checkpoints")  # a kept copy
    assert Path(manifest.source.path).is_relative_to(tmp_path / "checkpoints")  # tunable again

    # the data the job wrote: every conversation, none of the opted-out user's words
    folder = job_folder(tmp_path, 1)
    written = (folder / "train.jsonl").read_text() + (folder / "heldout.jsonl").read_text()
    assert SECRET not in written and "topic 0.0" in written
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    trained = (folder / "train.jsonl").read_text()
    assert all(c["messages"][0]["content"] not in trained for c in held)  # by conversation

    # Use it while a reply streams: the reply finishes on tiny@1, new ones go to tiny@2
    await bot.chat.update_settings(channel, 1, max_tokens=40, temperature=1.0)
    await fake.dispatch_message(channel, alice, f"<@{fake.bot_user['id']}> hi", [fake.bot_user])
    await gate.wait()
    pressed = await fake.dispatch_component(done, admin, "ft:use:1")
    hook = f"/webhooks/{fake.app_id}/{pressed['token']}/messages/@original"
    swapped = await fake.wait_for(lambda r: r.method == "PATCH" and r.path == hook, 60)
    assert "tiny@2" in swapped.json["content"]
    assert bot.backend.model.ref == "tiny@2" and bot.active_replies == 1
    gate.open()
    await fake.wait_until(lambda: bot.active_replies == 0, 60)
    (reply,) = [r for r in await stored(bot, channel) if r.role == Role.ASSISTANT]
    assert reply is not None and reply.model_version == "tiny@1" and reply.status == "complete"
    assert (await job_row(bot, 1)).figures.get("used") is True


async def test_cancel_stops_the_job_and_publishes_nothing(
    fake: FakeDiscord, start_bot: Start, registry_copy: Path
) -> None:
    bot = await start_bot(model_registry=registry_copy)
    admin, olga = fake.add_user("admin", admin=True), fake.add_user("olga")
    await store_conversations(bot, fake, olga)
    channel = fake.text_channel_ids[9]
    await command(fake, channel, admin, "model", finetune(10_000))  # far more than runs here
    shown = await fake.wait_until(
        lambda: (m := progress_message(fake, channel)) and "ft:cancel:1" in custom_ids(m) and m, 60
    )
    mallory = fake.add_user("mallory")
    refused = await fake.dispatch_component(shown, mallory, "ft:cancel:1")
    reply = await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{refused['id']}/"))
    assert "administrators only" in reply.json["data"]["content"]
    await fake.dispatch_component(shown, admin, "ft:cancel:1")
    ended = await fake.wait_until(
        lambda: (m := progress_message(fake, channel)) and "Cancelled" in m["content"] and m, JOB_S
    )
    assert custom_ids(ended) == []
    assert (await job_row(bot, 1)).status == JobStatus.CANCELLED
    assert [v.ref for v in Registry(registry_copy).versions()] == ["tiny@1"]
    _, listed = await command(fake, channel, admin, "model", [{"type": 1, "name": "jobs"}])
    assert "#1" in listed.json["data"]["content"] and "cancelled" in listed.json["data"]["content"]


async def test_non_admins_and_too_little_data_are_refused(
    fake: FakeDiscord, start_bot: Start, registry_copy: Path
) -> None:
    bot = await start_bot(model_registry=registry_copy)
    mallory, admin = fake.add_user("mallory"), fake.add_user("admin", admin=True)
    channel = fake.text_channel_ids[2]
    _, refused = await command(fake, channel, mallory, "model", finetune(2))
    assert "administrators only" in refused.json["data"]["content"]
    _, empty = await command(fake, channel, admin, "model", finetune(2))
    assert "not enough stored conversations" in empty.json["data"]["content"]
    async with bot.db.session() as s:
        assert (await s.scalars(FinetuneJob.__table__.select())).all() == []


async def test_a_restart_marks_a_running_job_failed_and_says_so(
    fake: FakeDiscord, start_bot: Start, registry_copy: Path, tmp_path: Path
) -> None:
    channel = fake.text_channel_ids[3]
    note = await post_as_bot(fake, {"id": str(fake.new_id()), "channel_id": str(channel)}, "job")
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async with db.session() as s, s.begin():
        s.add(FinetuneJob(guild_id=fake.guild_id, channel_id=channel, started_by=1,
                          status=JobStatus.RUNNING, phase="training", step=3, total=10,
                          options={"owner": 2**22 + 1}, figures={},
                          progress_message_id=int(note["id"])))  # fmt: skip
    await db.close()
    bot = await start_bot(model_registry=registry_copy)
    edited = await fake.wait_for(
        lambda r: r.method == "PATCH" and r.path == f"/channels/{channel}/messages/{note['id']}", 60
    )
    assert "Failed: the bot stopped while this job ran" in edited.json["content"]
    job = await job_row(bot, 1)
    assert job.status == JobStatus.FAILED and "restart" in (job.error or "")
