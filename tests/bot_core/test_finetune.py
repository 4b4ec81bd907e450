"""bot/finetune's units: the split by conversation, refusals (data, disk, memory, one job at a
time), the base checkpoint kept under DATA_DIR/checkpoints, progress lines, orphaned jobs."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from bot.finetune import jobs, plan
from bot.finetune.data import MIN_CONVERSATIONS, check_amount, held_out, split
from bot.finetune.errors import FinetuneError
from bot.finetune.progress import training_line
from bot.finetune.runner import _progress
from bot.storage.models import FinetuneJob, JobStatus


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def test_the_split_is_by_whole_conversation_and_stable():
    records = [conversation(i) for i in range(50)]
    train, kept = split(records)
    assert len(train) + len(kept) == 50 and train and kept
    assert not {id(r) for r in train} & {id(r) for r in kept}
    assert split(list(reversed(records)))[1] == list(reversed(kept))  # order does not matter
    assert all(held_out(r) for r in kept)
    two = [conversation(i) for i in range(2)]
    assert [len(part) for part in split(two)] == [1, 1]  # at least one on each side


def test_too_little_data_is_a_clear_refusal():
    check_amount(MIN_CONVERSATIONS)
    with pytest.raises(FinetuneError, match="not enough stored conversations to fine-tune: 1"):
        check_amount(1)


def make_plan(source: Path, params: int, method: str = "full", kind: str = "hf") -> plan.Plan:
    return plan.Plan("tiny@1", "tiny", source, kind, "fp32", False, params, method, 256, 256)


def test_lora_above_a_size_and_the_parameter_count(tiny_registry):
    from models.checkpoint import load_checkpoint

    info = tiny_registry.active()
    manifest = info.manifest()
    real = sum(t.numel() for t in load_checkpoint(manifest.source.path).tensors.values())
    norms_and_biases = real - plan.count_params(manifest.architecture)
    assert 0 <= norms_and_biases < 0.05 * real
    assert plan.plan_for(info).method == "full"
    assert plan.plan_for(info, "lora").method == "lora"
    big = manifest.architecture.model_copy(update={"vocab_size": 10**6, "hidden_size": 4096})
    assert plan.count_params(big) > plan.LORA_ABOVE_PARAMS


def test_short_disk_or_memory_refuses(tmp_path: Path, monkeypatch):
    job = make_plan(tmp_path, params=10**9)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda _: Usage(0, 0, 10**9))
    with pytest.raises(FinetuneError, match="not enough disk space"):
        plan.check_room(job, tmp_path)
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda _: Usage(0, 0, 10**15))
    monkeypatch.setattr(plan, "available_memory", lambda: 10**9)
    with pytest.raises(FinetuneError, match="not enough memory"):
        plan.check_room(job, tmp_path)
    monkeypatch.setattr(plan, "available_memory", lambda: 10**12)
    plan.check_room(job, tmp_path)


def test_the_base_is_kept_under_checkpoints(tmp_path: Path):
    folder = tmp_path / "elsewhere" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    gguf = tmp_path / "elsewhere" / "m.gguf"
    gguf.write_bytes(b"GGUF")
    checkpoints = tmp_path / "data" / "checkpoints"
    kept = plan.keep_base(make_plan(folder, 1), checkpoints)
    assert kept.is_relative_to(checkpoints) and (kept / "config.json").read_text() == "{}"
    assert plan.keep_base(make_plan(folder, 1), checkpoints) == kept  # once
    kept_gguf = plan.keep_base(make_plan(gguf, 1, kind="gguf"), tmp_path / "other")
    assert kept_gguf.name == "m.gguf" and kept_gguf.read_bytes() == b"GGUF"
    inside = checkpoints / "mine"
    inside.mkdir()
    assert plan.keep_base(make_plan(inside, 1), checkpoints) == inside.resolve()


def test_a_gone_base_checkpoint_is_refused(tiny_registry, tmp_path: Path):
    import shutil

    from export.registry import Registry

    root = tmp_path / "registry"
    shutil.copytree(tiny_registry.root, root)
    info = Registry(root).active()
    manifest = info.manifest()
    manifest.source.path = str(tmp_path / "gone")
    manifest.write(info.path)
    with pytest.raises(FinetuneError, match="which is gone"):
        plan.plan_for(info)


def test_progress_lines_are_validated_and_shown():
    assert _progress({"event": "step", "step": 2, "total": 4, "loss": 1.5}) == (2, 4, 1.5)
    for bad in ({"step": "2", "total": 4}, {"step": 1, "total": 0}, {"step": -1, "total": 3}):
        with pytest.raises(FinetuneError, match="malformed progress line"):
            _progress(bad)
    job = FinetuneJob(step=2, total=4, loss=1.5, figures={"train_seconds": 10.0})
    assert training_line(job) == "step 2/4, loss 1.500, elapsed 0m10s, ETA 0m10s"


async def test_one_job_at_a_time_and_orphans_fail(db):
    first = await jobs.create(db, guild_id=1, channel_id=2, started_by=3, options={})
    with pytest.raises(FinetuneError, match="one fine-tuning job runs at a time"):
        await jobs.create(db, guild_id=1, channel_id=2, started_by=3, options={})
    await jobs.update(db, first.id, status=JobStatus.RUNNING)
    (orphan,) = await jobs.fail_orphans(db)  # this process's job: its runner is gone
    assert orphan.id == first.id
    job = await jobs.get(db, first.id)
    assert job is not None and job.status == JobStatus.FAILED and "restart" in (job.error or "")
    assert job.started_at is not None and job.finished_at is not None
    second = await jobs.create(db, guild_id=1, channel_id=2, started_by=3, options={})
    assert [j.id for j in await jobs.recent(db, guild_id=1)] == [second.id, first.id]
