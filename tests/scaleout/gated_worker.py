"""A worker process that holds each reply once it has written visible text, for as long as the
Redis key PREFIX:test:hold exists: `python -m tests.scaleout.gated_worker ID` (configured like
`python -m bot worker`). Tests set the key to catch replies mid-stream and delete it to let
them finish."""

from __future__ import annotations

import asyncio
import json
import sys

from bot.backends.worker import InferenceWorker, Job
from bot.config import get_settings
from bot.logs import configure_logging
from bot.worker import serve


def hold_key(prefix: str) -> str:
    return f"{prefix}:test:hold"


class GatedWorker(InferenceWorker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shown: set[str] = set()  # entry ids whose reply has written visible text

    async def _write(self, job: Job, data: str, expire: int | None = None) -> None:
        await super()._write(job, data, expire)
        event = json.loads(data)
        if event["t"] == "p" and event["x"].strip():
            self._shown.add(job.entry_id)
        if event["t"] == "p" and job.entry_id in self._shown:
            while await self.client.exists(hold_key(self.keys.prefix)):
                await asyncio.sleep(0.05)


if __name__ == "__main__":
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets())
    asyncio.run(serve(settings, sys.argv[1], GatedWorker))
