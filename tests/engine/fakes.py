"""Test seams of the engine: a graph runner whose steps a test can watch, block or fail, and a
clock that moves only when the test moves it (`Engine.start(wrap_runner=..., clock=...)`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from bot.engine import Engine
from bot.engine.session import GraphRunner

# hook(kind, args) runs on the engine thread before a step: kind "prefill" with
# (slot, n_tokens, past) or "decode" with (first, n); it may block or raise
Hook = Callable[[str, tuple[int, ...]], None]
WAIT_S = 60.0  # a safety net only: no test waits this long unless it is broken


class StepRunner:
    """The real graph runner, with a log of its steps and an optional hook before each."""

    def __init__(self, inner: GraphRunner, hook: Hook | None = None) -> None:
        self.inner = inner
        self.hook = hook
        self.steps: list[tuple[str, tuple[int, ...]]] = []
        self.released = threading.Event()

    def __getattr__(self, name: str) -> Any:  # slots, vocab, ids, seqlens, info, ...
        return getattr(self.inner, name)

    def _before(self, kind: str, args: tuple[int, ...]) -> None:
        self.steps.append((kind, args))
        if self.hook is not None:
            self.hook(kind, args)

    def decode(self, first: int, n: int) -> np.ndarray:
        self._before("decode", (first, n))
        return self.inner.decode(first, n)

    def prefill(self, slot: int, tokens: np.ndarray, past: int) -> np.ndarray:
        self._before("prefill", (slot, len(tokens), past))
        return self.inner.prefill(slot, tokens, past)

    def release(self) -> None:
        self.inner.release()
        self.released.set()

    def decodes(self) -> list[tuple[int, ...]]:
        """The (first, n) row range of every decode step so far."""
        return [args for kind, args in self.steps if kind == "decode"]

    def kv_rows(self, slot: int, length: int) -> dict[str, np.ndarray]:
        """A copy of the first `length` cached entries of `slot`, per KV buffer (CPU only)."""
        return self.inner.cached(slot, length)


class Runners:
    """`wrap_runner` for Engine.start: wraps (and keeps) the runner of every version loaded;
    `hook` is given to each new one."""

    def __init__(self, hook: Hook | None = None) -> None:
        self.hook = hook
        self.all: list[StepRunner] = []

    def __call__(self, runner: GraphRunner) -> StepRunner:
        self.all.append(StepRunner(runner, self.hook))
        return self.all[-1]

    @property
    def first(self) -> StepRunner:
        return self.all[0]


class Gate:
    """A hook that holds the engine thread before the first step of `kind` (with these `args`,
    when given) after `after` such steps have run, until `open()`.

    Until then nothing else runs in the engine (one thread steps every request), so a test can
    queue, cancel, swap or move the clock while a request is known to be mid-generation.
    """

    def __init__(
        self, kind: str = "decode", args: tuple[int, ...] | None = None, *, after: int = 0
    ) -> None:
        self.kind, self.args, self.after = kind, args, after
        self.reached = threading.Event()
        self._open = threading.Event()

    def __call__(self, kind: str, args: tuple[int, ...]) -> None:
        if self._open.is_set() or kind != self.kind or self.args not in (None, args):
            return
        if self.after > 0:  # the steps before it run (their pieces reach the event loop)
            self.after -= 1
            return
        self.reached.set()
        self._open.wait(WAIT_S)

    async def wait(self) -> None:
        """Until the engine thread is held at the gate."""
        assert await asyncio.to_thread(self.reached.wait, WAIT_S), "the gate was never reached"

    def open(self) -> None:
        self._open.set()


def fail(kind: str = "decode") -> Hook:
    """A hook under which every step of `kind` fails as ONNX Runtime would."""

    def hook(step: str, args: tuple[int, ...]) -> None:
        if step == kind:
            raise RuntimeError("simulated ORT failure")

    return hook


class FakeClock:
    """Engine time that stands still until the test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def start_engine(
    registry, ref: str = "llama", *, runners: Runners | None = None, **kw: Any
) -> Engine:
    """An engine on the CPU over `registry` (one slot unless told), its runners wrapped."""
    kw.setdefault("slots", 1)
    return await Engine.start(ref, registry=registry.root, device="cpu", wrap_runner=runners, **kw)
