"""Turning generated token ids into text as it streams: whole UTF-8 characters only, stop strings never leaked."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """Accumulates tokens and releases text that is final.

    Text is withheld while it ends in an incomplete UTF-8 character (the tokenizer decodes it as U+FFFD) or could
    be the start of a stop string; a stop string found anywhere ends the text just before it.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._tokens: list[int] = []
        self._released = 0  # characters of the decoded text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._visible()[: self._released]

    def _visible(self) -> str:
        return self._decode(self._tokens)

    def add(self, token: int) -> str:
        """Take one token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        text = self._visible()
        if text.endswith("\ufffd"):
            return ""  # the middle of a multi-byte character: wait for the rest
        for stop in self._stop:
            found = text.find(stop, max(self._released - len(stop) + 1, 0))
            if found != -1:
                self.stopped = True
                return self._release(text, found)
        hold = max((self._partial_stop(text, stop) for stop in self._stop), default=0)
        return self._release(text, len(text) - hold)

    def finish(self) -> str:
        """The end of the sequence: release what was held back for a stop string that never completed."""
        if self.stopped:
            return ""
        text = self._visible().rstrip("\ufffd")
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        upto = max(upto, self._released)
        piece = text[self._released: upto]
        self._released = upto
        return piece

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a beginning of ``stop``."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0
