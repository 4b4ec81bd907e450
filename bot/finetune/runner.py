"""One job, run as child processes: `python -m models finetune`, `models eval` on the base and
the tuned checkpoint, then `python -m export` with the quality gate. The event loop only reads
their output (JSON lines) and records the job's state in the database as it goes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bot.finetune import jobs
from bot.finetune.data import prepare
from bot.finetune.errors import FinetuneError
from bot.finetune.plan import LORA_RANK, Plan, check_room, keep_base
from bot.storage.models import FinetuneJob, JobStatus

log = logging.getLogger(__name__)

OnUpdate = Callable[[FinetuneJob], Awaitable[None]]
SAMPLES = 3  # held-out prompts answered by the old and the new version
TAIL = 20  # output lines kept to explain a failed step


def job_folder(data_dir: Path, job_id: int) -> Path:
    return data_dir / "finetune" / f"job-{job_id}"


def tuned_folder(data_dir: Path, plan: Plan, job_id: int) -> Path:
    """Where the tuned checkpoint stays (the new version's source: it can be tuned again)."""
    return data_dir / "checkpoints" / f"{plan.name}-job{job_id}"


class Cancelled(Exception):
    """The job was cancelled while it ran."""


class JobRunner:
    """Runs one job at a time; `cancel()` stops the step that runs and ends it as cancelled."""

    def __init__(
        self, db: Any, data_dir: Path, registry: Path, on_update: OnUpdate | None = None
    ) -> None:
        self.db, self.data_dir, self.registry = db, Path(data_dir), Path(registry)
        self.on_update = on_update
        self.job_id: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._cancelled = False

    @property
    def busy(self) -> bool:
        return self.job_id is not None

    def cancel(self) -> bool:
        """Stop the running job (its child process group is terminated); False when idle."""
        if self.job_id is None:
            return False
        self._cancelled = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        return True

    async def _set(self, job_id: int, **fields: Any) -> FinetuneJob:
        job = await jobs.update(self.db, job_id, **fields)
        if self.on_update is not None:
            try:
                await self.on_update(job)
            except Exception:  # showing progress must never stop the job
                log.exception("cannot show the progress of job %s", job_id)
        return job

    async def run(self, job: FinetuneJob, plan: Plan) -> FinetuneJob:
        """Run `job` to its end: finished (a new version published), failed or cancelled."""
        if self.job_id is not None:
            raise FinetuneError(f"job {self.job_id} is running; one job runs at a time")
        self.job_id, self._cancelled = job.id, False
        try:
            await self._set(job.id, status=JobStatus.RUNNING, phase="data")
            result = await self._steps(job, plan)
            return await self._set(job.id, status=JobStatus.FINISHED, phase="done", **result)
        except Cancelled:
            return await self._set(job.id, status=JobStatus.CANCELLED, phase="cancelled")
        except FinetuneError as exc:
            if self._cancelled:
                return await self._set(job.id, status=JobStatus.CANCELLED, phase="cancelled")
            return await self._set(job.id, status=JobStatus.FAILED, phase="failed", error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            note = f"{type(exc).__name__}: {exc}"[:500]
            return await self._set(job.id, status=JobStatus.FAILED, phase="failed", error=note)
        finally:
            self.job_id, self._proc = None, None

    def _check(self) -> None:
        if self._cancelled:
            raise Cancelled

    async def _steps(self, job: FinetuneJob, plan: Plan) -> dict[str, Any]:
        folder = job_folder(self.data_dir, job.id)
        folder.mkdir(parents=True, exist_ok=True)
        options = job.options or {}
        data = await prepare(self.db, job.guild_id, folder, options.get("channels") or ())
        await self._set(job.id, figures={"data": data.summary, "method": plan.method,
                                         "base": plan.base_ref})  # fmt: skip
        await asyncio.to_thread(check_room, plan, self.data_dir)
        base = await asyncio.to_thread(keep_base, plan, self.data_dir / "checkpoints")
        self._check()
        out = tuned_folder(self.data_dir, plan, job.id)
        steps = int(options.get("steps", 100))
        max_length = min(int(options.get("max_length", 256)), plan.max_positions)
        await self._set(job.id, phase="training", step=0, total=steps)
        train = [sys.executable, "-m", "models", "finetune", str(base), "--data", str(data.train),
                 "--val-data", str(data.held_out), "--out", str(out), "--max-steps", str(steps),
                 "--eval-every", str(steps), "--batch-size", str(options.get("batch_size", 4)),
                 "--max-length", str(max_length), "--warmup-steps",
                 str(min(4, steps // 4)), "--no-progress", "--progress-json", "--json"]  # fmt: skip
        if plan.method == "lora":
            train += ["--lora", str(LORA_RANK)]
        summary = await self._child(job.id, train, progress=True)
        self._check()
        await self._set(job.id, phase="evaluating")
        evaluate = ["--data", str(data.held_out), "--split", "all", "--replies", str(SAMPLES),
                    "--max-new-tokens", "32", "--max-length", str(max_length),
                    "--json"]  # fmt: skip
        before = await self._child(job.id, [sys.executable, "-m", "models", "eval", str(base),
                                            *evaluate])  # fmt: skip
        after = await self._child(job.id, [sys.executable, "-m", "models", "eval", str(out),
                                           *evaluate])  # fmt: skip
        self._check()
        figures = {
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
            "train_loss": summary.get("train_loss"),
            "seconds_per_step": summary.get("seconds_per_step"),
            "samples": [
                {"prompt": b["prompt"], "before": b["reply"], "after": a["reply"]}
                for b, a in zip(before["samples"], after["samples"], strict=False)
            ],
        }
        await self._set(job.id, phase="exporting", figures=figures)
        info = {"job_id": job.id, "base": plan.base_ref, "base_checkpoint": str(base),
                "method": plan.method, "steps": summary.get("steps", steps),
                "perplexity_before": figures["perplexity_before"],
                "perplexity_after": figures["perplexity_after"],
                "data": data.summary, "samples": figures["samples"]}  # fmt: skip
        info_file = folder / "finetune.json"
        info_file.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
        export = [sys.executable, "-m", "export", str(out), "--name", plan.name, "--precision",
                  plan.precision, "--max-context", str(plan.max_context),
                  "--registry", str(self.registry), "--finetune-info",
                  str(info_file), "--json"]  # fmt: skip
        if plan.gate_passed:
            export.append("--require-gate")
        published = await self._child(job.id, export)
        ref = f"{published.get('name', plan.name)}@{published.get('version')}"
        gate = published.get("gate")
        return {"result_ref": ref, "figures": {"gate": gate} if gate else {}}

    async def _child(self, job_id: int, cmd: Sequence[str], progress: bool = False) -> dict:
        """Run one step in its own process group; its last JSON line is the result. Progress
        lines ({"event": "step", ...}) update the job as they come."""
        self._check()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own group: cancel stops it with its children
        )
        self._proc = proc
        if self._cancelled:  # cancelled while it was starting
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        await jobs.update(self.db, job_id, pid=proc.pid)
        assert proc.stdout is not None
        tail: list[str] = []
        result: dict | None = None
        started = time.monotonic()
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            data = _json(line)
            if data is None:
                if line:
                    tail = [*tail, line][-TAIL:]
                continue
            if progress and data.get("event") == "step":
                step, total, loss = _progress(data)
                elapsed = time.monotonic() - started
                await self._set(job_id, step=step, total=total, loss=loss,
                                figures={"train_seconds": elapsed})  # fmt: skip
            else:
                result = data
        rc = await proc.wait()
        self._check()
        if rc != 0 or result is None:
            why = next((t for t in reversed(tail) if t.startswith("error:")), None)
            step = Path(cmd[2]).name + (" " + cmd[3] if cmd[2] == "models" else "")
            raise FinetuneError(f"{step} failed (exit {rc}): {why or (tail[-1] if tail else '')}")
        return result


def _json(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _progress(data: dict) -> tuple[int, int, float | None]:
    """A progress line, validated like any input from outside."""
    step, total, loss = data.get("step"), data.get("total"), data.get("loss")
    if not isinstance(step, int) or not isinstance(total, int) or step < 0 or total < 1:
        raise FinetuneError(f"malformed progress line from the training process: {data!r:.100}")
    return step, total, float(loss) if isinstance(loss, int | float) else None
