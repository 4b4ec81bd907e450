"""A worker process that hangs after streaming the first piece of its first reply, until killed:
`python -m tests.scaleout.stalling_worker ID` (configured like `python -m bot worker`)."""

from __future__ import annotations

import asyncio
import sys

from bot.backends.worker import InferenceWorker, Job
from bot.config import get_settings
from bot.worker import serve


class StallingWorker(InferenceWorker):
    async def _write(self, job: Job, data: str, expire: int | None = None) -> None:
        await super()._write(job, data, expire)
        if '"t":"p"' in data:
            await asyncio.Event().wait()  # hung mid-reply: only kill -9 ends this process


if __name__ == "__main__":
    asyncio.run(serve(get_settings(), sys.argv[1], StallingWorker))
