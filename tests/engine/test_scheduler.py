"""Continuous batching paths: cancel, timeout, queue full, prompt too long, hot swap, KV slots."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bot.engine import (
    Engine,
    ModelLoadError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from tests.engine.conftest import run

LONG = SamplingParams(greedy=True, max_new_tokens=200, ignore_eos=True)
SHORT = SamplingParams(greedy=True, max_new_tokens=6, ignore_eos=True)


async def _start(registry, ref="llama", **kw) -> Engine:
    kw.setdefault("slots", 1)
    return await Engine.start(ref, registry=registry.root, device="cpu", **kw)


def test_cancel_ends_the_stream_and_frees_the_slot(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        try:
            a = engine.submit([1, 2, 3], LONG)
            b = engine.submit([1, 4, 5], SHORT)  # waits for the only slot
            got = []
            async for piece in a:
                got.append(piece)
                if len(got) == 3:
                    a.cancel()
            ra = a.result
            rb = await asyncio.wait_for(b.collect(), 10)
            return ra, rb
        finally:
            await engine.close()

    ra, rb = run(go())
    assert ra.finish_reason == "cancelled" and 3 <= ra.completion_tokens < 200
    assert rb.finish_reason == "length" and rb.completion_tokens == 6
    assert rb.queue_ms > 0


def test_cancel_while_queued(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        try:
            a = engine.submit([1, 2, 3], LONG)
            b = engine.submit([1, 4, 5], SHORT)
            b.cancel()
            rb = await asyncio.wait_for(b.collect(), 10)
            a.cancel()
            return rb, await a.collect()
        finally:
            await engine.close()

    rb, ra = run(go())
    assert (rb.finish_reason, rb.completion_tokens) == ("cancelled", 0)
    assert ra.finish_reason == "cancelled"


def test_timeout_running_and_queued(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        runner = engine._scheduler.current.runner
        real = runner.decode

        def slow(first, n):  # 5 ms a step: 250 tokens cannot finish within the 200 ms limit
            time.sleep(0.005)
            return real(first, n)

        runner.decode = slow
        try:
            a = engine.submit(
                [1, 2, 3],
                SamplingParams(greedy=True, max_new_tokens=250, ignore_eos=True),
                timeout_s=0.2,
            )
            b = engine.submit([1, 4], SHORT, timeout_s=0.01)
            return await asyncio.gather(a.collect(), b.collect())
        finally:
            await engine.close()

    ra, rb = run(go())
    assert rb.finish_reason == "timeout" and rb.completion_tokens == 0
    assert ra.finish_reason == "timeout" and 1 <= ra.completion_tokens < 250


def test_queue_full_is_a_clear_busy_error(engine_registry):
    async def go():
        engine = await _start(engine_registry, max_queue=2)
        try:
            streams = [engine.submit([1, 2], LONG)]
            await streams[0].__anext__()  # running in the only slot
            streams += [engine.submit([1, 2], LONG) for _ in range(2)]  # the queue is full
            with pytest.raises(QueueFullError, match="busy"):
                engine.submit([1, 2], LONG)
            for s in streams:
                s.cancel()
            return [await s.collect() for s in streams]
        finally:
            await engine.close()

    results = run(go())
    assert all(r.finish_reason == "cancelled" for r in results)


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
    async def alone(ref, prompt, params):
        engine = await _start(engine_registry, ref)
        try:
            return await engine.submit(prompt, params).collect()
        finally:
            await engine.close()

    params = SamplingParams(greedy=True, max_new_tokens=60, ignore_eos=True)

    async def go():
        engine = await _start(engine_registry, "llama", slots=2)
        try:
            old = engine.submit([1, 2, 3], params)
            first = await old.__anext__()
            with pytest.raises(ModelLoadError, match="nope"):
                await engine.swap("nope")  # a failed load leaves the engine as it was
            assert engine.model.ref == "llama@1"
            model = await engine.swap("qwen2")
            assert engine.model.ref == model.ref == "qwen2@1"
            new = engine.submit([1, 2, 3], params)
            r_old, r_new = await asyncio.gather(old.collect(), new.collect())
            for _ in range(100):  # the old session is released once its request is done
                if len(engine._scheduler.workers) == 1:
                    break
                await asyncio.sleep(0.01)
            return first, r_old, r_new, len(engine._scheduler.workers)
        finally:
            await engine.close()

    first, r_old, r_new, workers = run(go())
    assert r_old.model == "llama@1" and r_new.model == "qwen2@1"
    assert r_old.token_ids == run(alone("llama", [1, 2, 3], params)).token_ids
    assert r_new.token_ids == run(alone("qwen2", [1, 2, 3], params)).token_ids
    assert r_old.text.startswith(first)
    assert workers == 1


def test_prefill_writes_only_its_own_slot(engine_registry):
    """A one-slot prefill binds a pointer into that slot's rows of the shared KV buffer."""
    from bot.engine.loader import load_model
    from bot.engine.session import GraphRunner, create_session

    model = load_model("llama", engine_registry.root)
    session, info = create_session(model.graph_path, "cpu")
    runner = GraphRunner(session, info, slots=3)
    logits = runner.prefill(1, np.array([1, 2, 3, 4, 5]), 0).copy()
    kv = runner._kv["past_key_values.0.key"]
    assert not kv[0].any() and not kv[2].any()
    assert kv[1, :, :5].any() and not kv[1, :, 5:].any()
    # the same tokens through a decode step of every slot continue identically in slot 1
    runner.ids[:, 0], runner.seqlens[:] = [0, 6, 0], [0, 5, 0]
    step = runner.decode(0, 3).copy()
    alone = GraphRunner(*create_session(model.graph_path, "cpu"), slots=1)
    np.testing.assert_allclose(alone.prefill(0, np.array([1, 2, 3, 4, 5]), 0), logits, atol=1e-5)
    np.testing.assert_allclose(alone.prefill(0, np.array([6]), 5), step[1], atol=1e-5)
    assert len(runner._decode_bindings) == 1  # the binding is made once per row range
    runner.seqlens[:] += 1
    runner.decode(0, 3)
    assert len(runner._decode_bindings) == 1
    # slot 1 alone (rows 1..1) gives the same logits as a run over every row
    runner.seqlens[:] = [0, 5, 0]
    np.testing.assert_allclose(runner.decode(1, 1)[1], step[1], atol=1e-5)


def test_close_ends_running_requests(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        s = engine.submit([1, 2, 3], LONG)
        await s.__anext__()
        t = time.perf_counter()
        await engine.close()
        return await asyncio.wait_for(s.collect(), 5), time.perf_counter() - t

    result, took = run(go())
    assert result.finish_reason == "cancelled" and took < 5


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(engine_registry):
    async def go():
        engine = await _start(engine_registry)
        runner = engine._scheduler.current.runner
        real = runner.decode

        def broken(first, n):
            raise RuntimeError("simulated ORT failure")

        try:
            runner.decode = broken
            failed = await engine.generate([1, 2, 3], SHORT)
            runner.decode = real
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
    even after an unrelated request ran beside the kept slot (a free row riding along in decode
    steps writes after what the slot keeps), and its seeded samples equal a cold engine's."""
    first = list(range(3, 40))
    other = list(range(100, 130))

    async def go():
        engine = await _start(engine_registry, kind, slots=2)
        kv = engine._scheduler.current.runner._kv
        try:
            a = await engine.generate(first, _greedy(8))
            held = len(first) + len(a.token_ids) - 1
            before = {name: buf[0, :, :held].copy() for name, buf in kv.items()}
            b = await engine.generate(other, _greedy(20))  # slot 1; free slot 0 rides along
            for name, buf in kv.items():  # slot 0's kept entries were not touched
                np.testing.assert_array_equal(buf[0, :, :held], before[name])
            follow = first + a.token_ids + [7, 8, 9]
            c = await engine.generate(follow, SAMPLED)
            again = await engine.generate(follow, SAMPLED)  # all but the last token kept
        finally:
            await engine.close()
        cold = await _start(engine_registry, kind, slots=1)
        try:
            want = await cold.generate(follow, SAMPLED)
        finally:
            await cold.close()
        return a, b, c, again, want, follow

    a, b, c, again, want, follow = run(go())
    assert (a.cached_tokens, b.cached_tokens) == (0, 0)  # nothing shared with anything kept
    assert c.cached_tokens == len(first) + len(a.token_ids) - 1  # the last sampled one was not fed
    assert again.cached_tokens == len(follow) - 1
    assert want.cached_tokens == 0
    assert c.token_ids == want.token_ids == again.token_ids


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
    async def go():
        engine = await _start(engine_registry, slots=1)
        runner = engine._scheduler.current.runner
        real = runner.decode
        prompt = list(range(3, 40))
        try:
            await engine.generate(prompt, _greedy(4))

            def broken(first, n):
                raise RuntimeError("simulated ORT failure")

            runner.decode = broken
            await engine.generate(list(range(50, 90)), _greedy(4))
            runner.decode = real
            return await engine.generate(prompt, _greedy(4))
        finally:
            await engine.close()

    assert run(go()).cached_tokens == 0


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
        engine = await _start(engine_registry, slots=3)
        runner = engine._scheduler.current.runner
        real, ranges = runner.decode, []

        def spy(first, n):
            ranges.append((first, n))
            return real(first, n)

        try:
            for start in (3, 100, 200):  # three unrelated prompts fill slots 0, 1, 2
                await engine.generate(list(range(start, start + 30)), _greedy(4))
            runner.decode = spy
            third = await engine.generate([*range(200, 230), 7], _greedy(6))
        finally:
            await engine.close()
        return third, ranges

    third, ranges = run(go())
    assert third.cached_tokens == 30  # back in slot 2
    assert ranges and set(ranges) == {(2, 1)}
