"""Text to token ids with the `tokenizers` library, for the models whose entries carry a ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")


class TextEncoder:
    """A loaded tokenizer and the model's input limit. Encoding never pads or truncates: callers decide."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = next((i for t in PAD_TOKENS if (i := tokenizer.token_to_id(t)) is not None), 0)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> TextEncoder:
        """Load ``tokenizer.json``."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, special tokens included."""
        if len(texts) == 1:  # encode_batch hands even one text to its thread pool, which then competes with ORT's
            return [self._tokenizer.encode(texts[0], add_special_tokens=add_special_tokens).ids]
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """An incremental decoder for one generated sequence: each token in, the text it completes out (``None``
        while it ends inside a multi-byte character)."""
        from tokenizers.decoders import DecodeStream

        decoder, tokenizer = DecodeStream(skip_special_tokens=skip_special_tokens), self._tokenizer
        return lambda token: decoder.step(tokenizer, token)
