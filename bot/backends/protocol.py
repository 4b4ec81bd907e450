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
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.engine import GenerationResult, SamplingParams
from export.registry import REF_RE

GROUP = "workers"
DEFAULT_PREFIX = "bot"
KEY_TTL_S = 3600  # outstanding request keys live at most this long past their timeout
MAX_TIMEOUT_S = 7 * 24 * 3600.0
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # request ids (they go into key names)
WORKER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # worker ids (default: HOST-PID)


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


# What comes from Redis is validated like user input: strict types (no bool for an int, no
# string for a number), finite numbers, ids and sizes within bounds.
_Strict = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Count = Annotated[int, Field(ge=0, lt=2**31)]
Ratio = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-100, le=100)]


class _Params(BaseModel):
    """SamplingParams as they travel (SamplingParams itself checks the ranges it knows)."""

    model_config = _Strict
    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_k: Count = 0
    top_p: Ratio = 1.0
    min_p: Ratio = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=100)] = 1.0
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    no_repeat_ngram_size: Count = 0
    max_new_tokens: Annotated[int, Field(ge=1, lt=2**31)] = 256
    min_new_tokens: Count = 0
    stop: Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=64)] = []
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    greedy: bool = False


Id = Annotated[str, Field(pattern=f"^{ID_RE.pattern}$")]


class _Request(BaseModel):
    model_config = _Strict
    id: Id
    prompt: Annotated[list[TokenId], Field(min_length=1, max_length=1 << 20)]
    params: _Params
    model: str
    timeout_s: Annotated[float, Field(ge=0, le=MAX_TIMEOUT_S)] | None
    submitted: Annotated[float, Field(ge=0)]

    @field_validator("model")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if valid_ref(value) is None:
            raise ValueError("expected NAME@N")
        return value


class _Beat(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)  # newer workers may add fields
    id: Annotated[str, Field(pattern=f"^{WORKER_ID_RE.pattern}$")]
    model: Annotated[str, Field(max_length=200)]
    provider: Annotated[str, Field(max_length=200)]
    slots: Count
    busy: Count
    tokens_per_s: Annotated[float, Field(ge=0)]
    time: float


def _problem(exc: ValidationError) -> str:
    """The first thing wrong, on one line: `field.path: message`."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "entry"
    return f"{where}: {error['msg']}"


def loads(data: str | bytes) -> Any:
    """JSON from Redis: text that is UTF-8 (the clients decode with surrogateescape, so bytes
    that are not arrive as lone surrogates) and standard JSON (no NaN or Infinity)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogateescape")
    if not isinstance(data, str):
        raise ValueError(f"expected text, got {type(data).__name__}")
    try:
        data.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not UTF-8 text") from None

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not a number")

    try:
        return json.loads(data, parse_constant=constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def request_id_of(data: str | bytes) -> str | None:
    """The id of a request entry, however malformed the rest, if it has a valid one (so its
    sender can be told); None otherwise."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogateescape")
    try:
        raw = json.loads(data)  # lenient here (NaN, Infinity, lone surrogates): only the id counts
    except (TypeError, ValueError, RecursionError):
        return None
    rid = raw.get("id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and ID_RE.fullmatch(rid) else None


def decode_beat(data: str | bytes) -> dict[str, Any]:
    """A worker's heartbeat, validated; ValueError (one line) on anything malformed."""
    try:
        return _Beat.model_validate(loads(data)).model_dump()
    except ValidationError as exc:
        raise ValueError(f"malformed heartbeat: {_problem(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"malformed heartbeat: {exc}") from None


def valid_ref(value: Any) -> str | None:
    """A version pin read from Redis if it is NAME@N (never a path), else None."""
    if isinstance(value, str) and "@" in value and REF_RE.fullmatch(value) and ".." not in value:
        return value
    return None


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
        """The request, every field checked (types, ranges, finite numbers, ids); ValueError
        (one line) on anything malformed."""
        try:
            raw = _Request.model_validate(loads(data))
            params = raw.params.model_dump()
            params["stop"] = tuple(params["stop"])
            if params["stop_token_ids"] is not None:
                params["stop_token_ids"] = tuple(params["stop_token_ids"])
            return cls(
                id=raw.id,
                prompt=raw.prompt,
                params=SamplingParams(**params),
                model=raw.model,
                timeout_s=raw.timeout_s,
                submitted=raw.submitted,
            )
        except ValidationError as exc:
            raise ValueError(f"malformed generation request: {_problem(exc)}") from None
        except (TypeError, ValueError) as exc:
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


class _Result(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)  # unknown fields ignored
    token_ids: Annotated[list[TokenId], Field(max_length=1 << 20)] = []
    text: str = ""
    finish_reason: Literal["stop", "length", "cancelled", "timeout", "error"] = "error"
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    error: str | None = None
    model: Annotated[str, Field(max_length=200)] = ""
    cached_tokens: Count = 0


class _Event(BaseModel):
    model_config = _Strict
    t: Literal["s", "p", "e"]
    a: Count
    w: str | None = None
    x: str | None = None
    r: _Result | None = None


def result_from_dict(data: dict[str, Any]) -> GenerationResult:
    """ValueError (one line) unless `data` is a valid GenerationResult."""
    try:
        return GenerationResult(**_Result.model_validate(data).model_dump())
    except ValidationError as exc:
        raise ValueError(f"malformed result: {_problem(exc)}") from None


def decode_event(data: str | bytes) -> dict[str, Any]:
    """One reply-stream event as a worker wrote it, validated; ValueError (one line) if not:
    a piece ("p") has its text "x", an end ("e") its result "r"."""
    try:
        event = _Event.model_validate(loads(data))
    except ValidationError as exc:
        raise ValueError(f"malformed reply event: {_problem(exc)}") from None
    if (event.t == "p" and event.x is None) or (event.t == "e" and event.r is None):
        raise ValueError(f"malformed reply event: {event.t!r} without its data")
    return event.model_dump()


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
