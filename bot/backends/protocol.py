"""The Redis protocol between bot processes and inference workers: keys, messages, scripts.

Keys (PREFIX defaults to "bot"):
  PREFIX:requests          Stream of generation requests; consumer group "workers". An entry is
                           acked and deleted once answered, so its length minus the pending
                           count is the number of requests no worker has taken yet.
  PREFIX:req:ID            marker set while request ID is outstanding (a restarted, empty Redis
                           has none, which is how the bot notices that a request was lost)
  PREFIX:reply:ID          Stream of events for request ID, written by the worker that runs it:
                           {"t": "s", "a": attempt, "w": worker}   an attempt starts
                           {"t": "p", "a": attempt, "x": text}     a piece of text
                           {"t": "e", "a": attempt, "r": {...}}    the end: GenerationResult
  PREFIX:attempt:ID        counter: a worker that starts (or restarts, after a claim) request
                           ID takes the next attempt number; the bot ignores older attempts
  PREFIX:cancel:ID         set by the bot to stop request ID (the worker polls its requests)
  PREFIX:model             NAME@N new requests are pinned to (set by /model use on any shard)
  PREFIX:workers           set of worker ids; PREFIX:worker:ID their heartbeat (JSON, with TTL)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from bot.engine import GenerationResult, SamplingParams

GROUP = "workers"
DEFAULT_PREFIX = "bot"
KEY_TTL_S = 3600  # outstanding request keys live at most this long past their timeout


class Keys:
    """Every Redis key of one deployment (one PREFIX)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.requests = f"{prefix}:requests"
        self.model = f"{prefix}:model"
        self.workers = f"{prefix}:workers"

    def marker(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    def attempt(self, request_id: str) -> str:
        return f"{self.prefix}:attempt:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"


@dataclass(frozen=True)
class GenerationRequest:
    """One request as it travels on the requests stream."""

    id: str
    prompt: list[int]
    params: SamplingParams
    model: str  # NAME@N the reply must come from
    timeout_s: float | None
    submitted: float  # time.time() at submit (the deadline holds across claims)

    def encode(self) -> str:
        params = dataclasses.asdict(self.params)
        return json.dumps(
            {
                "id": self.id,
                "prompt": self.prompt,
                "params": params,
                "model": self.model,
                "timeout_s": self.timeout_s,
                "submitted": self.submitted,
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, data: str | bytes) -> GenerationRequest:
        """ValueError (one line) on anything malformed."""
        try:
            raw = json.loads(data)
            params = dict(raw["params"])
            params["stop"] = tuple(params.get("stop") or ())
            if params.get("stop_token_ids") is not None:
                params["stop_token_ids"] = tuple(params["stop_token_ids"])
            return cls(
                id=str(raw["id"]),
                prompt=[int(t) for t in raw["prompt"]],
                params=SamplingParams(**params),
                model=str(raw["model"]),
                timeout_s=None if raw.get("timeout_s") is None else float(raw["timeout_s"]),
                submitted=float(raw["submitted"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed generation request: {exc}") from None

    def remaining_s(self, now: float | None = None) -> float | None:
        """Seconds left of its timeout (None: no timeout)."""
        if self.timeout_s is None:
            return None
        return self.timeout_s - ((time.time() if now is None else now) - self.submitted)

    def key_ttl_s(self) -> int:
        return int((self.timeout_s or 0) + KEY_TTL_S)


def event(kind: str, attempt: int, **fields: Any) -> str:
    return json.dumps({"t": kind, "a": attempt, **fields}, separators=(",", ":"))


def result_to_dict(result: GenerationResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


def result_from_dict(data: dict[str, Any]) -> GenerationResult:
    known = {f.name for f in dataclasses.fields(GenerationResult)}
    return GenerationResult(**{k: v for k, v in data.items() if k in known})


# ---- Lua scripts (atomic steps) -----------------------------------------------------------------
# KEYS: requests, marker. ARGV: group, max waiting, payload, key ttl. The new entry id, or nil
# when max waiting requests are already waiting for a worker.
ENQUEUE = """
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then return false end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[4])
return redis.call('XADD', KEYS[1], '*', 'd', ARGV[3])
"""

# KEYS: requests. ARGV: group, consumer, entry ids... For each entry still owned by consumer,
# reset its idle time (so it is not claimed from a live worker); returns the ids it lost.
REFRESH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    table.insert(lost, ARGV[i])
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return lost
"""

# KEYS: requests, attempt, reply, marker. ARGV: group, entry id, attempt, end event, ttl.
# Writes the end event and acks the entry, only if `attempt` is still the request's latest.
FINISH = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[3], '*', 'd', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
