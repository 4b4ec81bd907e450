"""Token choice in numpy, batched over a decode step: penalties, bans, temperature,
top-k/top-p/min-p, each request's own seeded generator."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from bot.engine.types import SamplingParams


class Sampler:
    """The sampling state of one request (penalty sets, n-grams, its generator).

    Order (as transformers): repetition penalty (prompt and completion), frequency and presence
    penalties (completion), no-repeat n-gram bans (completion), stop-token ban before
    min_new_tokens, then argmax, or temperature -> top-k -> top-p -> min-p -> one draw from the
    request's own numpy Generator. `choose_batch` does this for a whole decode step; a row's token
    never depends on the other rows, so a seed gives the same tokens batched or alone.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], stop_ids: tuple[int, ...]
    ) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.stop_ids = np.asarray(stop_ids, np.int64)
        self.seen = np.unique(np.asarray(prompt_ids, np.int64))  # repetition penalty set
        self._seen_set = set(self.seen.tolist())
        self.counts: dict[int, int] = defaultdict(int)  # completion token -> count
        self.generated: list[int] = []
        self.ngrams: dict[tuple[int, ...], set[int]] = defaultdict(set)

    def accept(self, token: int) -> None:
        """Record a chosen token (updates the penalty and n-gram state)."""
        self.generated.append(token)
        self.counts[token] += 1
        if token not in self._seen_set:
            self._seen_set.add(token)
            self.seen = np.append(self.seen, token)
        n = self.p.no_repeat_ngram_size or 0
        if n and len(self.generated) >= n:
            gram = tuple(self.generated[-n:])
            self.ngrams[gram[:-1]].add(gram[-1])

    @property
    def _repetition(self) -> float:
        return self.p.repetition_penalty or 1.0

    @property
    def _other_adjustments(self) -> bool:
        """Adjustments other than the repetition penalty apply to the next choice."""
        p, n = self.p, self.p.no_repeat_ngram_size or 0
        return bool(
            ((p.frequency_penalty or p.presence_penalty) and self.counts)
            or (n and len(self.generated) >= n - 1)
            or (len(self.generated) < p.min_new_tokens and len(self.stop_ids))
        )

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one row with every adjustment applied (the row-by-row form)."""
        x = logits.copy()  # float32; a copy: the row belongs to the graph's output buffer
        rep = self._repetition
        if rep != 1.0 and len(self.seen):
            vals = x[self.seen]
            x[self.seen] = np.where(vals > 0, vals / rep, vals * rep)
        return self._adjust_others(x)

    def _adjust_others(self, x: np.ndarray) -> np.ndarray:
        p = self.p
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            ids = np.fromiter(self.counts.keys(), np.int64, len(self.counts))
            cnt = np.fromiter(self.counts.values(), np.float32, len(self.counts))
            x[ids] -= cnt * (p.frequency_penalty or 0.0) + (p.presence_penalty or 0.0)
        n = p.no_repeat_ngram_size or 0
        if n and len(self.generated) >= n - 1:
            prefix = tuple(self.generated[len(self.generated) - (n - 1) :]) if n > 1 else ()
            banned = self.ngrams.get(prefix)
            if banned:
                x[list(banned)] = -np.inf
        if len(self.generated) < p.min_new_tokens and len(self.stop_ids):
            x[self.stop_ids] = -np.inf
        return x

    def choose(self, logits: np.ndarray) -> int:
        """The next token for this logits row ([vocab], float32)."""
        return choose_batch([self], logits[None], [0])[0]

    def _choose_row(self, x: np.ndarray) -> int:
        """A draw from one adjusted row, for the settings choose_batch does not vectorise."""
        k, vocab = self.p.top_k or 0, len(x)
        cand = _top_k(x, k) if 0 < k < vocab else np.flatnonzero(np.isfinite(x))
        scaled = x[cand].astype(np.float64) / self.p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        min_p = self.p.min_p or 0.0
        if min_p > 0:  # relative to the best token, so it commutes with top-p
            keep = probs >= min_p * probs.max()
            cand, probs = cand[keep], probs[keep]
        top_p = self.p.top_p if self.p.top_p is not None else 1.0
        if top_p < 1.0:
            cand, probs = _nucleus(cand, probs, top_p)
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(cand[min(i, len(cand) - 1)])


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values, in token order, ties at the k-th value to the lower ids (the
    draw must not depend on how a partition happens to order them).

    The k-th largest of a strided sample of 64k values is a lower bound for the k-th largest of
    all (k values reach it), so only the ~1.5% of values at or above it need the exact
    partition: one pass over the row instead of partitioning all of it."""
    sample = x[:: max(1, len(x) // (64 * k))]
    bound = np.partition(sample, len(sample) - k)[len(sample) - k]
    above = np.flatnonzero(x >= bound)
    top = above[np.argpartition(x[above], len(above) - k)[len(above) - k :]]
    kth = x[top].min()
    if np.count_nonzero(x[above] == kth) > np.count_nonzero(x[top] == kth):
        # more tokens share the k-th value than fit: the lower ids, not the partition's pick
        greater = above[x[above] > kth]
        top = np.concatenate([greater, above[x[above] == kth][: k - len(greater)]])
    top.sort()
    return top


def _nucleus(cand: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest best-first set whose probability reaches top_p (sorting only the head)."""
    m = min(64, len(probs))
    while True:
        head = np.argpartition(-probs, m - 1)[:m] if m < len(probs) else np.arange(len(probs))
        head = head[np.lexsort((cand[head], -probs[head]))]  # best first, ties by token id
        total = np.cumsum(probs[head])
        if total[-1] >= top_p or m == len(probs):
            keep = int(np.searchsorted(total, top_p)) + 1
            head = head[: min(keep, m)]
            return cand[head], probs[head]
        m = min(4 * m, len(probs))


MAX_BATCHED_TOP_K = 1024  # sampled rows with 0 < top_k <= this are drawn as one array operation


def choose_batch(samplers: Sequence[Sampler], logits: np.ndarray, rows: Sequence[int]) -> list[int]:
    """The next token of each request: row rows[i] of `logits` [*, vocab] belongs to samplers[i].

    Greedy rows and sampled rows with a top-k (the bot's settings) are handled with array
    operations over the batch; other settings row by row. Each row's result depends only on its
    own logits and state (ties go to the lower token id), never on the batch it runs in.
    `logits` is only read (it is the graph's output buffer).
    """
    rows = np.asarray(rows)
    adjust = [(s._repetition != 1.0 and len(s.seen)) or s._other_adjustments for s in samplers]
    if any(adjust):
        x = logits[rows]  # a copy, adjusted in place
        _repetition_penalties(samplers, x)
        for i, s in enumerate(samplers):
            if s._other_adjustments:
                x[i] = s._adjust_others(x[i])
    else:  # nothing to change: read the rows where they are
        lo = int(rows.min())
        span = logits[lo : int(rows.max()) + 1]
        if all(s.p.is_greedy for s in samplers):
            return np.argmax(span, axis=1)[rows - lo].tolist()
        x = span[rows - lo]
    tokens = np.empty(len(samplers), np.int64)
    vocab = x.shape[1]
    greedy = [i for i, s in enumerate(samplers) if s.p.is_greedy]
    if greedy:
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    top_k = [
        i
        for i, s in enumerate(samplers)
        if not s.p.is_greedy and 0 < (s.p.top_k or 0) <= min(MAX_BATCHED_TOP_K, vocab - 1)
    ]
    if top_k:
        tokens[top_k] = _sample_top_k([samplers[i] for i in top_k], x[top_k])
    for i, s in enumerate(samplers):
        if not s.p.is_greedy and i not in top_k:
            tokens[i] = s._choose_row(x[i])
    return tokens.tolist()


def _repetition_penalties(samplers: Sequence[Sampler], x: np.ndarray) -> None:
    """The repetition penalty of every row at once (one scatter over all seen tokens)."""
    rows = [i for i, s in enumerate(samplers) if s._repetition != 1.0 and len(s.seen)]
    if not rows:
        return
    seen = [samplers[i].seen for i in rows]
    counts = [len(ids) for ids in seen]
    r = np.repeat(np.asarray(rows), counts)
    t = np.concatenate(seen)
    rep = np.repeat(np.asarray([samplers[i]._repetition for i in rows], np.float32), counts)
    vals = x[r, t]
    x[r, t] = np.where(vals > 0, vals / rep, vals * rep)


def _sample_top_k(samplers: Sequence[Sampler], x: np.ndarray) -> np.ndarray:
    """One draw a row: top-k (per row) -> temperature -> min-p -> top-p -> the row's generator.

    Columns past a row's own k hold -inf (probability 0), and every sum over a row is a
    cumulative one, so they do not change its figures: a row draws what it draws alone.
    """
    ks = [s.p.top_k for s in samplers]
    rows = np.arange(len(ks))[:, None]
    ids = np.zeros((len(ks), max(ks)), np.int64)
    for i, k in enumerate(ks):  # the exact top-k of each row, in token order (see _top_k)
        ids[i, :k] = _top_k(x[i], k)
    vals = np.where(np.arange(ids.shape[1]) < np.asarray(ks)[:, None], x[rows, ids], -np.inf)
    order = np.argsort(-vals, axis=1, kind="stable")  # best first; ties keep token order
    ids, vals = ids[rows, order], vals[rows, order].astype(np.float64)
    best = vals[:, :1]
    best = np.where(np.isfinite(best), best, 0.0)  # a row with every token banned: all zeros
    temperature = np.asarray([s.p.temperature for s in samplers])[:, None]
    probs = np.exp((vals - best) / temperature)
    total = np.cumsum(probs, axis=1)[:, -1]
    min_p = np.asarray([s.p.min_p or 0.0 for s in samplers])[:, None]
    probs = np.where(probs >= min_p * probs[:, :1], probs, 0.0)  # relative to the best token
    cdf = np.cumsum(probs, axis=1)
    top_p = np.asarray([1.0 if s.p.top_p is None else s.p.top_p for s in samplers])
    keep = (cdf < (top_p * total)[:, None]).sum(1) + 1  # the smallest best-first set >= top_p
    keep = np.minimum(keep, ids.shape[1])
    reach = cdf[rows[:, 0], keep - 1]  # the mass of the kept set
    draws = np.asarray([s.rng.random() for s in samplers]) * reach
    picked = np.minimum((cdf <= draws[:, None]).sum(1), keep - 1)
    return ids[rows[:, 0], picked]
