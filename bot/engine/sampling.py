"""Per-request token choice in numpy: penalties, bans, temperature, top-k/top-p/min-p, seed."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from bot.engine.types import SamplingParams


class Sampler:
    """Picks the next token of one request from its logits row.

    Order (as transformers): repetition penalty (prompt and completion), frequency and presence
    penalties (completion), no-repeat n-gram bans (completion), stop-token ban before
    min_new_tokens, then argmax, or temperature -> top-k -> top-p -> min-p -> one draw from the
    request's own numpy Generator, so a seed gives the same tokens batched or alone.
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

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        p = self.p
        x = logits.copy()  # float32; a copy: the row belongs to the graph's output buffer
        rep = p.repetition_penalty or 1.0
        if rep != 1.0 and len(self.seen):
            vals = x[self.seen]
            x[self.seen] = np.where(vals > 0, vals / rep, vals * rep)
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
        x = self._adjusted(logits)
        if self.p.is_greedy:
            return int(np.argmax(x))
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
    """Ids of the k largest values, in token order (the draw must not depend on how a partition
    happens to order them). The k-th largest of a strided sample is a lower bound for the k-th
    largest of all (k values reach it), so only the values at or above it need the exact
    partition: a tenth of the work of partitioning the whole vocabulary."""
    sample = x[:: max(1, len(x) // (8 * k))]
    bound = np.partition(sample, len(sample) - k)[len(sample) - k]
    above = np.flatnonzero(x >= bound)
    top = above[np.argpartition(x[above], len(above) - k)[len(above) - k :]]
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
