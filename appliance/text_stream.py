"""Turning generated token ids into text as it streams: whole UTF-8 characters only, stop strings never leaked."""

from __future__ import annotations

from collections.abc import Callable, Sequence

TokenStep = Callable[[int], "str | None"]  # one token in, the text it completes out (None or "" while pending)


class TextAssembler:
    """Accumulates the text of a stream of tokens and releases the part that is final.

    ``step`` is an incremental detokenizer (``TextEncoder.stream``: the ``tokenizers`` library's ``DecodeStream``),
    which withholds a token until it completes a UTF-8 character and costs the same for the thousandth token as
    for the first. Text that could be the start of a stop string is held back; a stop string found anywhere ends
    the text just before it.
    """

    def __init__(self, step: TokenStep, stop: Sequence[str] = ()) -> None:
        self._step = step
        self._stop = [s for s in stop if s]
        self._text = ""  # everything decoded so far: released, then held back
        self._released = 0  # characters of it already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._text[: self._released]

    def add(self, token: int) -> str:
        """Take one token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        piece = self._step(token)
        if not piece:
            return ""  # the middle of a multi-byte character, or a token with no text: nothing new to release
        self._text += piece
        text = self._text
        for stop in self._stop:
            found = text.find(stop, max(self._released - len(stop) + 1, 0))
            if found != -1:
                self.stopped = True
                return self._release(found)
        hold = max((self._partial_stop(text, stop) for stop in self._stop), default=0)
        return self._release(len(text) - hold)

    def finish(self) -> str:
        """The end of the sequence: release what was held back for a stop string that never completed."""
        if self.stopped:
            return ""
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        piece = self._text[self._released: upto]
        self._released = upto
        return piece

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a beginning of ``stop``."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0
