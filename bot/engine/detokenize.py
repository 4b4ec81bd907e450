"""Incremental detokenisation and stop-string holding for streamed text."""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
MAX_HELD = 8  # tokens held at most: a UTF-8 character has 4 bytes, so the rest is not completing


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces.

    Each step decodes the tail from `prefix` (a few tokens of context, so spacing rules apply)
    and emits what it adds beyond the tail's already emitted part. A tail that ends in U+FFFD is
    an incomplete multi-byte character: it is held until the next tokens complete it, but never
    more than MAX_HELD tokens (invalid bytes or text-less tokens would otherwise grow the tail and
    make each step decode all of it: quadratic in the reply).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        """Append one token; returns the newly complete text (possibly empty)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        held = len(self.ids) - self.read
        if (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT)) and held < MAX_HELD:
            return ""
        piece = text[len(prefix_text) :] if len(text) > len(prefix_text) else ""
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts the text at a full match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string is complete."""
        if not self.stops:
            return piece
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held text at the end of generation (it never became a stop string)."""
        text, self.held = self.held, ""
        return text
