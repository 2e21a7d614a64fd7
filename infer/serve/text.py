"""From tokens to the text a client receives, off the scheduler thread: incremental
detokenization, stop strings and the hold-back of text that could still become one.

The scheduler hands each request its new token ids after every iteration; the request's
handler turns them into text here (on the event loop), so the thread that owns the device
never decodes, and each iteration decodes a few tokens, not the whole answer again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 character


class IncrementalDetokenizer:
    """The text of a growing list of token ids, decoded a window at a time.

    ``decode(ids) -> str`` is the tokenizer's decoding. Each :meth:`add` decodes the ids
    from the start of the previous step's new tokens on, and keeps what that window adds
    to its own first part: a decoder that drops a leading space, or joins bytes across
    tokens, sees the same context it would in the whole list, so the pieces concatenate
    to ``decode(all ids)``. A piece that would end in an incomplete character waits for
    the tokens that complete it (:meth:`flush` gives it as it is, at the end).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # the pieces so far
        self._prefix = 0  # the window starts here ...
        self._read = 0  # ... and its text up to here is already in ``text``

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids``; returns the text they complete (possibly empty)."""
        self.ids += new_ids
        return self._step(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the end)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self.decode(self.ids[self._prefix:self._read])
        window = self.decode(self.ids[self._prefix:])
        if len(window) <= len(before) or (window.endswith(REPLACEMENT) and not final):
            return ""
        piece = window[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could begin a stop string (or complete an
    incomplete UTF-8 character, shown as U+FFFD): not safe to send yet."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    tail = len(text) - len(text.rstrip(REPLACEMENT))
    return max(n, tail)


class TextStream:
    """One request's answer as text: :meth:`add` takes the tokens of an iteration and
    returns the text that is safe to send and whether a stop string ended the answer
    (the text then stops before it; nothing after it is ever sent)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(decode)
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.sent = 0  # characters of text sent

    def add(self, new_ids: Sequence[int], last: bool = False) -> tuple[str, bool]:
        """``new_ids`` of one iteration (``last``: the answer ends with them)."""
        self.detok.add(new_ids)
        if last:
            self.detok.flush()
        text = self.detok.text
        hits = [i for s in self.stops
                if (i := text.find(s, max(0, self.sent - self._longest + 1))) >= 0]
        stopped = bool(hits)
        if stopped:
            text = text[:min(hits)]
        cut = len(text) if stopped or last else len(text) - holdback(text, self.stops)
        piece = text[self.sent:cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        return piece, stopped
