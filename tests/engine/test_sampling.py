"""Each sampling control changes the choice the way it should (Sampler alone and in the engine)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from bot.engine import Engine, SamplingParams
from bot.engine.sampling import Sampler, _top_k, choose_batch
from tests.engine.conftest import run
from tests.engine.fakes import Gate, Runners, start_engine

V = 10
LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05, 0, 0, 0, 0, 0]) + 1e-12).astype(np.float32)


def _draws(params: SamplingParams, n: int = 400, prompt=(0,)) -> Counter:
    sampler = Sampler(params, list(prompt), stop_ids=())
    return Counter(sampler.choose(LOGITS) for _ in range(n))


def test_greedy_and_temperature():
    assert _draws(SamplingParams(greedy=True), 20) == Counter({0: 20})
    assert _draws(SamplingParams(temperature=0), 20) == Counter({0: 20})
    hot = _draws(SamplingParams(temperature=1.0, seed=1))
    cold = _draws(SamplingParams(temperature=0.2, seed=1))
    assert set(hot) == {0, 1, 2, 3, 4}  # unlikely-but-possible tokens show up
    assert cold[0] > hot[0] + 100  # a low temperature sharpens towards the argmax


def test_top_k_top_p_min_p_limit_the_candidates():
    assert set(_draws(SamplingParams(top_k=2, seed=0))) == {0, 1}
    assert set(_draws(SamplingParams(top_k=1, seed=0))) == {0}
    # 0.4 + 0.3 = 0.7 < 0.75 <= 0.85: the nucleus is the first three
    assert set(_draws(SamplingParams(top_p=0.75, seed=0))) == {0, 1, 2}
    # min_p 0.3: keep p >= 0.12 -> 0.4, 0.3, 0.15
    assert set(_draws(SamplingParams(min_p=0.3, seed=0))) == {0, 1, 2}


def test_top_k_selection_is_exact_and_in_token_order():
    rng = np.random.default_rng(0)
    for trial in range(200):
        vocab = int(rng.integers(2, 60_000))
        k = int(rng.integers(1, min(vocab, 2_000)))
        x = rng.normal(0, 3, vocab).astype(np.float32)
        if trial % 3 == 0:  # banned tokens
            x[rng.integers(0, vocab, vocab // 2)] = -np.inf
        got = _top_k(x, k)
        assert len(got) == k and np.all(np.diff(got) > 0)
        assert np.array_equal(np.sort(x[got]), np.sort(x)[vocab - k :])


def test_top_p_over_a_flat_distribution_keeps_exactly_the_nucleus():
    flat = np.zeros(1000, np.float32)  # 1000 equal tokens: top_p 0.5 keeps 500 (ties by id)
    sampler = Sampler(SamplingParams(top_p=0.5, seed=0), [], ())
    draws = {sampler.choose(flat) for _ in range(3000)}
    assert max(draws) == 499 and len(draws) > 450


def test_seed_reproduces_and_differs():
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(seed=seed), [0], ())
        return [sampler.choose(LOGITS) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(1) != draws(2)


def test_repetition_penalty_pushes_away_from_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0, -1.2] + [-9] * 6, np.float32)
    assert Sampler(SamplingParams(greedy=True), [5], ()).choose(logits) == 0
    assert Sampler(SamplingParams(greedy=True, repetition_penalty=1.5), [0], ()).choose(logits) == 1
    # negative logits are multiplied: a seen -1.0 falls below an unseen -1.2
    negative = np.array([-1.0, -1.2] + [-9] * 8, np.float32)
    assert Sampler(SamplingParams(greedy=True), [0], ()).choose(negative) == 0
    assert (
        Sampler(SamplingParams(greedy=True, repetition_penalty=1.5), [0], ()).choose(negative) == 1
    )


def test_frequency_and_presence_penalties_count_completion_tokens():
    logits = np.array([3.0, 2.0, 1.0] + [-9] * 7, np.float32)
    s = Sampler(SamplingParams(greedy=True, frequency_penalty=0.6), [0], ())
    picks = []
    for _ in range(4):
        picks.append(s.choose(logits))
        s.accept(picks[-1])
    assert picks == [0, 0, 1, 0]  # token 0 drops below 2.0 after two uses
    s = Sampler(SamplingParams(greedy=True, presence_penalty=1.5), [0], ())
    s.accept(s.choose(logits))
    assert s.choose(logits) == 1  # 3.0 - 1.5 < 2.0


def test_min_new_tokens_bans_stop_tokens_until_reached():
    logits = np.array([5.0, 1.0] + [-9] * 8, np.float32)
    s = Sampler(SamplingParams(greedy=True, min_new_tokens=2), [3], stop_ids=(0,))
    first = s.choose(logits)
    s.accept(first)
    second = s.choose(logits)
    s.accept(second)
    assert (first, second, s.choose(logits)) == (1, 1, 0)


def test_invalid_parameters_are_refused_with_a_message():
    for kw, word in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0), "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kw)


def _random_params(rng: np.random.Generator, seed: int) -> SamplingParams:
    return SamplingParams(
        greedy=bool(rng.random() < 0.25),
        temperature=float(rng.choice([0.2, 0.7, 1.0, 1.5])),
        top_k=int(rng.choice([0, 1, 5, 50, 200])),
        top_p=float(rng.choice([1.0, 0.9, 0.5])),
        min_p=float(rng.choice([0.0, 0.05])),
        repetition_penalty=float(rng.choice([1.0, 1.1, 1.5])),
        presence_penalty=float(rng.choice([0.0, 0.0, 0.5])),
        seed=seed,
    )


def test_a_batch_draws_what_each_row_draws_alone():
    """choose_batch (array operations over the step) gives every row the token it gets alone,
    whatever its settings and neighbours; ties, frequent in fp16 logits, go to the lower id."""
    rng = np.random.default_rng(0)
    vocab, rows = 3000, 12
    for trial in range(25):
        logits = rng.normal(0, 3, (rows + 3, vocab)).astype(np.float32)
        if trial % 2:  # fp16 logits: many equal values
            logits = logits.astype(np.float16).astype(np.float32)
        logits[2, rng.integers(0, vocab, 100)] = -np.inf
        params = [_random_params(rng, seed=trial * 100 + i) for i in range(rows)]
        prompts = [rng.integers(0, vocab, 20).tolist() for _ in range(rows)]
        batch = [Sampler(p, q, ()) for p, q in zip(params, prompts, strict=True)]
        alone = [Sampler(p, q, ()) for p, q in zip(params, prompts, strict=True)]
        slots = rng.permutation(rows + 3)[:rows]
        for _ in range(3):  # the state (penalties, generators) moves on identically
            got = choose_batch(batch, logits, slots)
            want = [s.choose(logits[slot]) for s, slot in zip(alone, slots, strict=True)]
            assert got == want
            for s, t, u in zip(batch, got, alone, strict=True):
                s.accept(t)
                u.accept(t)
        before = logits.copy()
        choose_batch(batch, logits, slots)
        np.testing.assert_array_equal(logits, before)  # the graph's buffer is only read


def test_top_k_ties_go_to_the_lower_token_id():
    flat = np.zeros(100, np.float32)  # 100 equal tokens: top_k 3 keeps 0, 1, 2
    assert set(_draws(SamplingParams(top_k=3, seed=0), 300, prompt=())) <= {0, 1, 2}
    flat[50] = 1.0
    sampler = Sampler(SamplingParams(top_k=2, temperature=1e-3, seed=0), [], ())
    assert sampler.choose(flat) == 50
    assert Sampler(SamplingParams(top_k=1), [], ()).choose(np.zeros(9, np.float32)) == 0


def test_a_step_wakes_the_event_loop_once(engine_registry, monkeypatch):
    """Every stream's pieces of one decode step reach the loop in one call, not one a token."""
    from bot.engine.stream import _deliver

    async def go():
        loop = asyncio.get_running_loop()
        real, batches = loop.call_soon_threadsafe, []

        def recording(fn, *args, **kw):
            if fn is _deliver:
                batches.append(len(args[0]))
            return real(fn, *args, **kw)

        monkeypatch.setattr(loop, "call_soon_threadsafe", recording)
        params = SamplingParams(greedy=True, max_new_tokens=8, ignore_eos=True)
        # the engine waits at its first prefill until every request is queued, so however fast
        # the machine, the requests share their steps from the second step on
        gate = Gate("prefill")
        runners = Runners(gate)
        engine = await start_engine(engine_registry, slots=4, runners=runners)
        try:
            streams = [engine.submit(p, params) for p in PROMPTS]
            await gate.wait()
            gate.open()
            results = await asyncio.gather(*(s.collect() for s in streams))
        finally:
            await engine.close()
        return results, batches, len(runners.first.decodes())

    results, batches, decode_steps = run(go())
    assert all(r.completion_tokens == 8 for r in results)
    assert len(batches) <= decode_steps  # one wake-up a step, whatever it carried
    assert max(batches) >= len(PROMPTS)  # ... carrying every stream's pieces and results
    assert sum(batches) >= 2 * len(batches)


# ---- in the engine --------------------------------------------------------------------------
PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12], [1, 77]]


async def _results(registry, prompts, params, slots=4, ref="llama"):
    engine = await Engine.start(ref, registry=registry.root, device="cpu", slots=slots)
    try:
        streams = [engine.submit(p, params) for p in prompts]
        return await asyncio.gather(*(s.collect() for s in streams))
    finally:
        await engine.close()


def test_seeded_sampling_is_the_same_batched_or_alone(engine_registry):
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=1234, max_new_tokens=16)
    batched = run(_results(engine_registry, PROMPTS, params))
    alone = [run(_results(engine_registry, [p], params, slots=1))[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    other = run(
        _results(
            engine_registry, PROMPTS, SamplingParams(temperature=1.3, seed=99, max_new_tokens=16)
        )
    )
    assert [r.token_ids for r in other] != [r.token_ids for r in batched]


def test_top_k_1_equals_greedy(engine_registry):
    greedy = run(_results(engine_registry, PROMPTS, SamplingParams(greedy=True, max_new_tokens=12)))
    topk = run(
        _results(engine_registry, PROMPTS, SamplingParams(top_k=1, max_new_tokens=12, seed=5))
    )
    assert [r.token_ids for r in topk] == [r.token_ids for r in greedy]


def test_no_repeat_ngram_never_repeats_a_bigram(engine_registry):
    plain = run(
        _results(
            engine_registry,
            PROMPTS,
            SamplingParams(greedy=True, max_new_tokens=24, ignore_eos=True),
        )
    )
    # the tiny random model loops: without the ban bigrams repeat
    assert any(
        len(set(zip(r.token_ids, r.token_ids[1:], strict=False))) < len(r.token_ids) - 1
        for r in plain
    )
    banned = run(
        _results(
            engine_registry,
            PROMPTS,
            SamplingParams(greedy=True, max_new_tokens=24, no_repeat_ngram_size=2, ignore_eos=True),
        )
    )
    for r in banned:
        bigrams = list(zip(r.token_ids, r.token_ids[1:], strict=False))
        assert len(bigrams) == len(set(bigrams)) and len(r.token_ids) == 24


def test_stop_token_and_min_new_tokens(engine_registry):
    plain = run(
        _results(
            engine_registry,
            PROMPTS[:1],
            SamplingParams(greedy=True, max_new_tokens=8, ignore_eos=True),
        )
    )[0]
    stop = plain.token_ids[0]  # make the first greedy token a stop token
    ended = run(
        _results(
            engine_registry,
            PROMPTS[:1],
            SamplingParams(greedy=True, stop_token_ids=(stop,), max_new_tokens=8),
        )
    )[0]
    assert (ended.finish_reason, ended.token_ids, ended.text) == ("stop", [stop], "")
    held = run(
        _results(
            engine_registry,
            PROMPTS[:1],
            SamplingParams(greedy=True, stop_token_ids=(stop,), min_new_tokens=3, max_new_tokens=5),
        )
    )[0]
    assert stop not in held.token_ids[:3] and len(held.token_ids) >= 3


def test_stop_string_cuts_the_text_and_never_leaks(engine_registry):
    async def go(params):
        engine = await Engine.start("llama", registry=engine_registry.root, device="cpu", slots=1)
        try:
            stream = engine.submit([1, 5, 6, 7, 8, 9], params)
            pieces = [p async for p in stream]
            return pieces, stream.result
        finally:
            await engine.close()

    base = dict(temperature=1.0, seed=3, max_new_tokens=40, ignore_eos=True)
    _, full = run(go(SamplingParams(**base)))
    text = full.text
    assert len(text) > 12
    stop = text[6:9]  # a stop string inside the text: the output ends right before it
    pieces, cut = run(go(SamplingParams(**base, stop=(stop,))))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)] == "".join(pieces)
    assert all(stop not in p for p in pieces)
