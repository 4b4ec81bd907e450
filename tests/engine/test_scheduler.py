"""Continuous batching paths: cancel, timeout, queue full, prompt too long, hot swap, KV slots."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bot.engine import (
    Engine,
    EngineClosedError,
    ModelLoadError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from tests.engine.conftest import run
from tests.engine.fakes import WAIT_S, FakeClock, Gate, Runners, fail, start_engine

LONG = SamplingParams(greedy=True, max_new_tokens=200, ignore_eos=True)
SHORT = SamplingParams(greedy=True, max_new_tokens=6, ignore_eos=True)


async def _start(registry, ref="llama", **kw) -> Engine:
    return await start_engine(registry, ref, **kw)


def test_cancel_ends_the_stream_and_frees_the_slot(engine_registry):
    """A is held in its first decode step while B queues for the only slot; cancelling A frees
    it for B, whose queue time is exactly the engine time it waited."""

    async def go():
        gate, clock = Gate(), FakeClock()
        engine = await _start(engine_registry, runners=Runners(gate), clock=clock)
        try:
            a = engine.submit([1, 2, 3], LONG)
            await gate.wait()  # A holds the slot: its prompt is in, one token sampled
            b = engine.submit([1, 4, 5], SHORT)
            clock.advance(2.5)
            a.cancel()
            gate.open()
            ra = await asyncio.wait_for(a.collect(), 30)
            rb = await asyncio.wait_for(b.collect(), 30)
            return ra, rb
        finally:
            gate.open()
            await engine.close()

    ra, rb = run(go())
    # the step A was held in still finishes (its second token), then the cancel ends it
    assert (ra.finish_reason, ra.completion_tokens) == ("cancelled", 2)
    assert rb.finish_reason == "length" and rb.completion_tokens == 6
    assert ra.queue_ms == 0.0  # a free slot: admitted before any engine time passed
    assert rb.queue_ms == pytest.approx(2500.0)  # waited from its submit to A's cancel


def test_cancel_while_queued(engine_registry):
    async def go():
        gate = Gate()
        engine = await _start(engine_registry, runners=Runners(gate))
        try:
            a = engine.submit([1, 2, 3], LONG)
            await gate.wait()
            b = engine.submit([1, 4, 5], SHORT)
            b.cancel()
            a.cancel()
            gate.open()
            return await asyncio.wait_for(b.collect(), 30), await a.collect()
        finally:
            gate.open()
            await engine.close()

    rb, ra = run(go())
    assert (rb.finish_reason, rb.completion_tokens) == ("cancelled", 0)
    assert (ra.finish_reason, ra.completion_tokens) == ("cancelled", 2)


def test_timeout_running_and_queued(engine_registry):
    """Deadlines on the engine's clock: while A is held mid-generation, the clock moves past
    both A's deadline and that of B, which waits for the only slot."""

    async def go():
        gate, clock = Gate(), FakeClock()
        engine = await _start(engine_registry, runners=Runners(gate), clock=clock)
        try:
            a = engine.submit([1, 2, 3], LONG, timeout_s=10.0)
            await gate.wait()
            b = engine.submit([1, 4], SHORT, timeout_s=1.0)
            clock.advance(10.0)
            gate.open()
            return await asyncio.wait_for(asyncio.gather(a.collect(), b.collect()), 30)
        finally:
            gate.open()
            await engine.close()

    ra, rb = run(go())
    assert (rb.finish_reason, rb.completion_tokens) == ("timeout", 0)
    assert (ra.finish_reason, ra.completion_tokens) == ("timeout", 2)


def test_a_deadline_not_reached_does_not_end_a_request(engine_registry):
    async def go():
        clock = FakeClock()
        engine = await _start(engine_registry, clock=clock)
        try:
            return await engine.generate([1, 2, 3], SHORT, timeout_s=0.001)  # time stands still
        finally:
            await engine.close()

    result = run(go())
    assert (result.finish_reason, result.completion_tokens) == ("length", 6)


def test_queue_full_is_a_clear_busy_error(engine_registry):
    async def go():
        gate = Gate()
        engine = await _start(engine_registry, runners=Runners(gate), max_queue=2)
        try:
            streams = [engine.submit([1, 2], LONG)]
            await gate.wait()  # running in the only slot
            streams += [engine.submit([1, 2], LONG) for _ in range(2)]  # the queue is full
            with pytest.raises(QueueFullError, match="busy"):
                engine.submit([1, 2], LONG)
            for s in streams:
                s.cancel()
            gate.open()
            return [await s.collect() for s in streams]
        finally:
            gate.open()
            await engine.close()

    results = run(go())
    assert [r.finish_reason for r in results] == ["cancelled"] * 3


def test_prompt_too_long_and_bad_ids(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        try:
            ctx = engine.model.max_context
            with pytest.raises(PromptTooLongError, match=f"{ctx - 100}"):
                engine.submit([1] * (ctx - 99), SamplingParams(max_new_tokens=100))
            ok = engine.submit(
                [1] * (ctx - 100), SamplingParams(max_new_tokens=100, ignore_eos=True)
            )
            with pytest.raises(ValueError, match="token ids"):
                engine.submit([1, 10**6], SHORT)
            with pytest.raises(ValueError, match="non-empty"):
                engine.submit([], SHORT)
            return await ok.collect()
        finally:
            await engine.close()

    result = run(go())
    assert result.finish_reason == "length" and result.completion_tokens == 100


def test_hot_swap_while_streaming(engine_registry):
    """The old version's request is held mid-step while the engine swaps to the new version and
    a request starts there; both then finish, each on its own version, and the old one's
    session is released."""

    async def alone(ref, prompt, params):
        engine = await _start(engine_registry, ref)
        try:
            return await engine.submit(prompt, params).collect()
        finally:
            await engine.close()

    params = SamplingParams(greedy=True, max_new_tokens=60, ignore_eos=True)

    async def go():
        gate, runners = Gate(), Runners()
        engine = await _start(engine_registry, "llama", slots=2, runners=runners)
        runners.first.hook = gate  # only the old version's steps are held
        try:
            old = engine.submit([1, 2, 3], params)
            await gate.wait()
            with pytest.raises(ModelLoadError, match="nope"):
                await engine.swap("nope")  # a failed load leaves the engine as it was
            assert engine.model.ref == "llama@1" and len(runners.all) == 1
            model = await engine.swap("qwen2")
            assert engine.model.ref == model.ref == "qwen2@1"
            new = engine.submit([1, 2, 3], params)
            assert not runners.first.released.is_set()  # its request is still running
            gate.open()
            r_old, r_new = await asyncio.wait_for(asyncio.gather(old.collect(), new.collect()), 60)
            released = await asyncio.to_thread(runners.first.released.wait, WAIT_S)
            return r_old, r_new, released, runners.all[1].released.is_set()
        finally:
            gate.open()
            await engine.close()

    r_old, r_new, old_released, new_released = run(go())
    assert r_old.model == "llama@1" and r_new.model == "qwen2@1"
    assert r_old.token_ids == run(alone("llama", [1, 2, 3], params)).token_ids
    assert r_new.token_ids == run(alone("qwen2", [1, 2, 3], params)).token_ids
    assert old_released and not new_released


def test_close_ends_running_and_queued_requests_and_refuses_new_ones(engine_registry):
    """Close while A is held mid-step: once the engine refuses new requests it has been told to
    stop, so when the step ends A goes no further, and whatever waits in the queue ends too."""

    async def go():
        gate = Gate()
        engine = await _start(engine_registry, runners=Runners(gate))
        running = engine.submit([1, 2, 3], LONG)
        await gate.wait()
        queued = [engine.submit([1, 4, 5], SHORT)]  # waits for the only slot
        closing = asyncio.create_task(engine.close())
        while True:  # submit until the engine says it is closed (it queues what it takes)
            try:
                queued.append(engine.submit([1, 4, 5], SHORT))
            except QueueFullError:
                pass
            except EngineClosedError as exc:
                refusal = str(exc)
                break
            await asyncio.sleep(0.001)
        gate.open()
        await asyncio.wait_for(closing, 30)
        results = [await asyncio.wait_for(s.collect(), 30) for s in (running, *queued)]
        return refusal, results

    refusal, (running, *queued) = run(go())
    assert refusal == "the engine is closed"
    # the step it was held in gave its second token; then the engine stopped
    assert (running.finish_reason, running.completion_tokens) == ("cancelled", 2)
    assert all((r.finish_reason, r.completion_tokens) == ("cancelled", 0) for r in queued)


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(engine_registry):
    async def go():
        runners = Runners(fail("decode"))
        engine = await _start(engine_registry, runners=runners)
        try:
            failed = await engine.generate([1, 2, 3], SHORT)
            runners.first.hook = None
            ok = await engine.generate([1, 2, 3], SHORT)
            return failed, ok
        finally:
            await engine.close()

    failed, ok = run(go())
    assert failed.finish_reason == "error" and "simulated ORT failure" in failed.error
    assert failed.completion_tokens == 1  # the prefill's token, then the decode step failed
    assert ok.finish_reason == "length" and ok.completion_tokens == 6


# sampled, not greedy: the tiny random models' greedy output barely depends on the context
SAMPLED = SamplingParams(temperature=1.0, seed=11, max_new_tokens=8, ignore_eos=True)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(greedy=True, max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_next_turn_reuses_the_kept_prefix_and_gives_the_same_tokens(engine_registry, kind):
    """A prompt that starts with an earlier request's prompt and reply prefills only the rest,
    even after requests in the slots on both sides decoded together (the free row between them
    rides along and writes after what it keeps), and its seeded samples equal a cold engine's."""
    first = list(range(3, 40))
    shorter = list(range(40, 60))  # kept in slot 0, shorter than `first`: evicted before it

    async def go():
        gate = Gate("prefill")
        runners = Runners()
        engine = await _start(engine_registry, kind, slots=3, runners=runners)
        try:
            await engine.generate(shorter, _greedy(2))  # slot 0
            a = await engine.generate(first, _greedy(8))  # slot 1 (empty before)
            held = len(first) + len(a.token_ids) - 1
            before = runners.first.kv_rows(1, held)
            runners.first.hook = gate
            b = engine.submit(list(range(100, 130)), _greedy(20))  # slot 2, held at its prefill
            await gate.wait()
            c = engine.submit(list(range(130, 160)), _greedy(20))  # slot 0: decodes beside b
            gate.open()
            b, c = await asyncio.wait_for(asyncio.gather(b.collect(), c.collect()), 60)
            runners.first.hook = None
            after = runners.first.kv_rows(1, held)
            follow = first + a.token_ids + [7, 8, 9]
            d = await engine.generate(follow, SAMPLED)
            again = await engine.generate(follow, SAMPLED)  # all but the last token kept
        finally:
            gate.open()
            await engine.close()
        cold = await _start(engine_registry, kind, slots=1)
        try:
            want = await cold.generate(follow, SAMPLED)
        finally:
            await cold.close()
        return a, (b, c), before, after, runners.first.decodes(), d, again, want, follow

    a, others, before, after, decodes, d, again, want, follow = run(go())
    assert [r.cached_tokens for r in (a, *others)] == [0, 0, 0]  # nothing shared with the kept
    assert (0, 3) in decodes  # slots 0 and 2 decoded in one run, over the free slot 1
    for name, rows in before.items():  # and slot 1's kept entries were not touched
        np.testing.assert_array_equal(after[name], rows)
    assert d.cached_tokens == len(first) + len(a.token_ids) - 1  # the last sampled one: not fed
    assert again.cached_tokens == len(follow) - 1
    assert want.cached_tokens == 0
    assert d.token_ids == want.token_ids == again.token_ids


def test_a_new_prompt_takes_an_empty_slot_before_evicting_a_kept_one(engine_registry):
    async def go():
        engine = await _start(engine_registry, slots=2)
        try:
            first = list(range(3, 40))
            await engine.generate(first, _greedy(4))  # slot 0 keeps it
            await engine.generate(list(range(100, 140)), _greedy(4))  # goes to empty slot 1
            return await engine.generate([*first, 5], _greedy(4))
        finally:
            await engine.close()

    assert run(go()).cached_tokens == 37  # slot 0 still held the first prompt


def test_a_failed_step_forgets_every_kept_prefix(engine_registry):
    """The failing request reused the kept prefix and its slot would keep it again, but after a
    failed run nothing in the buffers is trusted: the next turn prefills from scratch."""

    async def go():
        runners = Runners()
        engine = await _start(engine_registry, slots=1, runners=runners)
        prompt = list(range(3, 40))
        try:
            await engine.generate(prompt, _greedy(4))
            runners.first.hook = fail("decode")
            failed = await engine.generate([*prompt, 1], _greedy(4))
            runners.first.hook = None
            return failed, await engine.generate([*prompt, 2], _greedy(4))
        finally:
            await engine.close()

    failed, again = run(go())
    assert failed.finish_reason == "error" and failed.cached_tokens == 37
    assert again.cached_tokens == 0


def test_a_shared_system_prompt_alone_does_not_evict_another_conversation(engine_registry):
    async def go():
        engine = await _start(engine_registry, slots=2)
        try:
            first = list(range(3, 40))
            await engine.generate(first, _greedy(4))  # slot 0 keeps 40 tokens
            stranger = await engine.generate(first[:20] + list(range(200, 230)), _greedy(4))
            back = await engine.generate([*first, 5], _greedy(4))
            return stranger, back
        finally:
            await engine.close()

    stranger, back = run(go())
    assert stranger.cached_tokens == 0  # 20 shared tokens are not worth 40 kept ones: slot 1
    assert back.cached_tokens == 37  # so the first conversation's prefix is still there


def test_a_lone_stream_in_a_high_slot_decodes_only_its_own_row(engine_registry):
    """Kept prefixes put a conversation back in its own slot, whatever its number: a decode
    step then runs from the lowest to the highest decoding slot, not from slot 0."""

    async def go():
        runners = Runners()
        engine = await _start(engine_registry, slots=3, runners=runners)
        try:
            for start in (3, 100, 200):  # three unrelated prompts fill slots 0, 1, 2
                await engine.generate(list(range(start, start + 30)), _greedy(4))
            before = len(runners.first.decodes())
            third = await engine.generate([*range(200, 230), 7], _greedy(6))
        finally:
            await engine.close()
        return third, runners.first.decodes()[before:]

    third, ranges = run(go())
    assert third.cached_tokens == 30  # back in slot 2
    assert ranges and set(ranges) == {(2, 1)}
