"""Engine.stats(): queued and active requests, slot count, model and provider."""

from __future__ import annotations

import asyncio

from bot.engine import SamplingParams
from bot.engine.types import EngineStats
from tests.engine.conftest import run
from tests.engine.fakes import Gate, Runners, start_engine

# as long as the tiny model's 256-token context allows: still running when the test looks
LONG = SamplingParams(greedy=True, max_new_tokens=250, ignore_eos=True)
SHORT = SamplingParams(greedy=True, max_new_tokens=4, ignore_eos=True)


def test_stats_count_queued_and_active_requests(engine_registry):
    async def go() -> tuple[EngineStats, EngineStats, EngineStats, str, str]:
        gate = Gate()
        engine = await start_engine(engine_registry, runners=Runners(gate))
        try:
            idle = engine.stats()
            running = engine.submit([1, 2, 3], LONG)
            await gate.wait()  # it holds the only slot now
            waiting = engine.submit([1, 4, 5], SHORT)  # queued behind it
            busy = engine.stats()
            running.cancel()
            gate.open()
            a = await asyncio.wait_for(running.collect(), 30)
            b = await asyncio.wait_for(waiting.collect(), 30)
            return idle, busy, engine.stats(), a.finish_reason, b.finish_reason
        finally:
            gate.open()
            await engine.close()

    idle, busy, done, reason_a, reason_b = run(go())
    assert idle == EngineStats(queued=0, active=0, slots=1, model="llama@1", provider="cpu")
    assert reason_a == "cancelled"
    assert (busy.queued, busy.active) == (1, 1)
    assert reason_b == "length"
    assert (done.queued, done.active) == (0, 0)


def test_stats_count_every_busy_slot_and_name_the_swapped_version(engine_registry):
    async def go() -> tuple[EngineStats, EngineStats, list[str]]:
        gate = Gate("decode", (0, 2))  # the first step that decodes both
        engine = await start_engine(engine_registry, slots=3, runners=Runners(gate))
        try:
            streams = [engine.submit([1, 2 + i], LONG) for i in range(2)]
            await gate.wait()
            busy = engine.stats()
            for stream in streams:
                stream.cancel()
            gate.open()
            reasons = [(await asyncio.wait_for(s.collect(), 30)).finish_reason for s in streams]
            await engine.swap("qwen2")
            return busy, engine.stats(), reasons
        finally:
            gate.open()
            await engine.close()

    busy, swapped, reasons = run(go())
    assert reasons == ["cancelled", "cancelled"]
    assert (busy.queued, busy.active, busy.slots, busy.model) == (0, 2, 3, "llama@1")
    assert (swapped.queued, swapped.active, swapped.model) == (0, 0, "qwen2@1")
