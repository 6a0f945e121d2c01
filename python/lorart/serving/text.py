"""Sampling parameters and a request's output text: incremental detokenization with stop strings."""
from __future__ import annotations

from dataclasses import dataclass

_REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens new tokens at most; temperature 0 = greedy; nucleus top_p; generation ends before the first
    of `stop` (not included in the text, as OpenAI's API); `seed` makes sampling reproducible per request."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy (dividing logits by them would overflow), as vLLM does."""
        return self.temperature < 1e-5

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: expected a number in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError(f"seed: expected a 64-bit integer, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(self.stop)!r}")


class TextStream:
    """The text of generated token ids, decoded incrementally (a window of the last tokens is decoded, so a
    request costs O(tokens), and text is released only once its UTF-8 is complete), cut before the first stop
    string. ``release()`` gives the new text that can no longer turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple = ()):
        self.tok = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0   # ids[_prefix:_read] decode to text already taken (the context of the next decode)
        self._read = 0
        self.text = ""
        self._sent = 0
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string when the text now contains one (the text is then
        cut before it and further pushes are ignored)."""
        if self.stopped is not None:
            return self.stopped
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith(_REPLACEMENT):
            self._append(now[len(before):])
            self._prefix, self._read = self._read, len(self.ids)
        return self.stopped

    def finish(self) -> None:
        """Take the text of any tokens still held back (an incomplete UTF-8 sequence at the very end)."""
        if self.stopped is None and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            now = self._decode(self.ids[self._prefix:])
            if len(now) > len(before):
                self._append(now[len(before):])
            self._prefix = self._read = len(self.ids)

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - self._hold)
        self.text += new
        if not self.stop:
            return
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped = s

    def release(self, final: bool = False) -> str:
        """New text since the last release; the last len(longest stop) - 1 characters wait unless `final`."""
        end = len(self.text) if final or self.stopped is not None else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out
