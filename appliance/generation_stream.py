"""The answer to a generate request: a stream of chunks, the same type whether the text is generated here, read
from the response cache or relayed from a cloud upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenCount:
    """Tokens read and written by one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those read from the KV cache (a prefix a row held) or a cloud's

    @property
    def total_tokens(self) -> int:
        """Prompt and completion together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Chunk:
    """A piece of one choice of the answer: text that is final, the token ids it came from, their logprob entries
    (OpenAI's ``{token, logprob, bytes, top_logprobs}``) and, on the choice's last chunk, why it ended; the stream's
    last chunk also carries the totals."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None  # stop, length
    usage: TokenCount | None = None
    index: int = 0  # the choice (several with ``n`` > 1 or a list of prompts)


class GenerationStream:
    """An async iterator of :class:`Chunk` for ``choices`` choices (indices ``0 .. choices - 1``, interleaved) that
    ends after every choice's chunk carrying its ``finish_reason``.

    Whoever reads it must close it (:meth:`aclose`, or ``async with``) whether it read to the end or not: closing
    stops the generation if it still runs and settles the request (its place at the model's gate, the accounting,
    the ledger and the response cache), exactly once.
    """

    def __init__(self, model: str, chunks: AsyncIterator[Chunk], tokens: TokenCount,
                 on_close: Callable[[GenerationStream], None], choices: int = 1) -> None:
        self.model = model  # the model that answers, or ``<upstream>:<model>``
        self.tokens = tokens  # kept up to date by the source as chunks arrive
        self.choices = choices
        self.finish_reasons: dict[int, str] = {}  # by choice, as each ends
        self.finish_reason: str | None = None  # the first choice's, once every choice has ended
        self.started = False  # at least one chunk was delivered
        self._chunks = chunks
        self._on_close: Callable[[GenerationStream], None] | None = on_close

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._on_close is None:
            raise StopAsyncIteration
        if self.finish_reason is not None:  # read to the end
            await self.aclose()
            raise StopAsyncIteration
        try:
            chunk = await anext(self._chunks)
        except BaseException:
            await self.aclose()
            raise
        self.started = True
        if chunk.finish_reason is not None:
            self.finish_reasons[chunk.index] = chunk.finish_reason
            if len(self.finish_reasons) >= self.choices:
                self.finish_reason = self.finish_reasons.get(0, chunk.finish_reason)
                chunk.usage = self.tokens
        return chunk

    async def aclose(self) -> None:
        """Stop reading; settle the request (once)."""
        on_close, self._on_close = self._on_close, None
        if on_close is None:
            return
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            on_close(self)

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
