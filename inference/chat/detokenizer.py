"""Incremental detokenization that never emits half a UTF-8 character.

Wraps `tokenizers.decoders.DecodeStream`, which buffers byte-level pieces until they form
whole characters, and adds `flush()` for the end of a generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns one generated token at a time into text, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # The last prompt tokens give the decoder its context (leading-space rules).
        self._stream = DecodeStream(ids=list(prompt_ids[-4:]), skip_special_tokens=True)
        self._held: list[int] = []

    def step(self, token_id: int) -> str:
        """Feed one token; return the text it completes ("" while a character is pending)."""
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception:  # an id outside the vocabulary: nothing to show for it
            return ""
        if text is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return str(text)

    def flush(self) -> str:
        """Text still held at the end. A character whose bytes never completed is dropped."""
        if not self._held:
            return ""
        text = self._tokenizer.decode(self._held, skip_special_tokens=True)
        self._held.clear()
        return str(text).rstrip("\ufffd").replace("\ufffd", "")
