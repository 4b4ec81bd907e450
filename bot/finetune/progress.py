"""A job as text: the progress message in the channel, `/model jobs` and the CLI's lines."""

from __future__ import annotations

from bot.storage.models import FinetuneJob, JobStatus

LIMIT = 1900  # under Discord's 2000 characters
SAMPLE_CHARS = 160
PHASES = {
    "queued": "queued",
    "data": "collecting the conversations",
    "training": "training",
    "evaluating": "evaluating the old and the new version on the held-out conversations",
    "exporting": "exporting with the quality gate",
}


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _clip(text: str) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def training_line(job: FinetuneJob) -> str:
    """step/total, loss, elapsed, ETA."""
    elapsed = float((job.figures or {}).get("train_seconds") or 0.0)
    parts = [f"step {job.step}/{job.total}"]
    if job.loss is not None:
        parts.append(f"loss {job.loss:.3f}")
    parts.append(f"elapsed {duration(elapsed)}")
    if 0 < job.step < job.total:
        parts.append(f"ETA {duration(elapsed / job.step * (job.total - job.step))}")
    return ", ".join(parts)


def describe(job: FinetuneJob, plan_text: str | None = None) -> str:
    """The whole progress message of a job, as it stands."""
    f = job.figures or {}
    method = {"lora": "LoRA", "full": "full fine-tuning"}.get(f.get("method", ""), "")
    head = f"**Fine-tuning job {job.id}**"
    if f.get("base"):
        head += f": {f['base']}" + (f", {method}" if method else "")
    lines = [head]
    if plan_text:
        lines.append(plan_text)
    data = f.get("data")
    if data:
        lines.append(
            f"data: {data['conversations']} conversations from {data['channels']} channel(s) "
            f"({data['train']} to train on, {data['held_out']} held out)"
        )
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        lines.append(PHASES.get(job.phase, job.phase) + "…")
    if job.total and (job.phase == "training" or job.status != JobStatus.QUEUED):
        lines.append("training: " + training_line(job))
    if "perplexity_before" in f:
        lines.append(
            f"held-out perplexity: {f['perplexity_before']:.2f} (old) -> "
            f"{f['perplexity_after']:.2f} (new)"
        )
    for sample in f.get("samples", []):
        lines += [
            f"> {_clip(sample['prompt'])}",
            f"  old: {_clip(sample['before'])}",
            f"  new: {_clip(sample['after'])}",
        ]
    gate = f.get("gate")
    if gate:
        verdict = "passed" if gate.get("passed") else "not passed"
        lines.append(
            f"quality gate {verdict}: {gate.get('answers_equal')}/{gate.get('prompts')} answers "
            "equal the fp32 graph's"
        )
    lines.append(ending(job))
    return "\n".join(line for line in lines if line)[:LIMIT]


def ending(job: FinetuneJob) -> str:
    if job.status == JobStatus.FINISHED:
        if (job.figures or {}).get("discarded"):
            return f"Discarded: {job.result_ref} was deleted."
        used = (job.figures or {}).get("used")
        if used:
            return f"**{job.result_ref}** is now running."
        return f"Published **{job.result_ref}**. Use it, or discard it."
    if job.status == JobStatus.FAILED:
        return f"Failed: {job.error}"
    if job.status == JobStatus.CANCELLED:
        return "Cancelled; nothing was published."
    return ""


def summary_line(job: FinetuneJob) -> str:
    """One line for `/model jobs`."""
    when = f"{job.created_at:%Y-%m-%d %H:%M}"
    text = f"#{job.id} {when} {job.status}"
    if job.status == JobStatus.RUNNING:
        text += f" ({job.phase}, step {job.step}/{job.total})"
    if job.result_ref:
        text += f" -> {job.result_ref}"
    if job.error:
        text += f": {job.error[:80]}"
    return text
