"""Grammar-constrained decoding with llguidance: at each step, tokens that would break the
grammar are masked out before sampling.

`Guide` is built once per model: llguidance's tokenizer (from the model's tokenizer.json,
with the logits width as its vocabulary and the model's own eos ids, which llguidance would
not find by itself for `<|end|>` or `<|im_end|>`), an executor that fills many rows' masks
in parallel, and the token bytes the log-probabilities report. `Guide.matchers` compiles a
grammar once (a worker thread's job; what a schema may cost is bounded by `schema_check`)
and starts one `Matcher` per sequence, copies of the first, with its first mask. Every later
mask is filled on the device thread, for all constrained rows of a step at once
(`Guide.fill`).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy as llnp
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from inference.chat.schema_check import check_schema
from inference.errors import InvalidInput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Bounds on what one grammar may cost. A mask that would need more lexer work than
# `step_lexer_fuel` puts the matcher in an error state instead of stalling the device thread
# (llguidance's default allows about 200 ms of work; measured on hostile schemas, see the
# docs/api.md); a grammar larger than `max_grammar_size` is refused when compiled.
STEP_LEXER_FUEL = 50_000
MAX_GRAMMAR_SIZE = 500_000
# JSON without optional whitespace: a small model given the choice may pad forever.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(step_lexer_fuel=STEP_LEXER_FUEL,
                                     max_grammar_size=MAX_GRAMMAR_SIZE)


def json_schema_grammar(schema: dict[str, Any], *, param: str = "response_format") -> str:
    """llguidance grammar text for output that is JSON valid against `schema`. Raises
    InvalidInput (naming `param`) for a schema past `schema_check`'s budget or bounds."""
    check_schema(schema, param=param)
    # as text: integers beyond 64 bits are valid JSON that llguidance's own encoder refuses
    return str(llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema, separators=(",", ":")), overrides=JSON_OPTIONS))


class Matcher:
    """One sequence's place in its grammar. Its first mask is computed when it is made (in a
    worker thread), so the device thread never pays a grammar's start-up cost."""

    def __init__(self, matcher: llguidance.LLMatcher, first: npt.NDArray[np.bool_]) -> None:
        self.matcher = matcher
        self.first = first

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete (or broken): the sequence ends."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""


class Guide:
    """llguidance for one model: its tokenizer, built on first use (about 0.2 s for a 49k
    vocabulary), and a mask executor."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor = llguidance.LLExecutor(num_threads=2)
        self._bytes: dict[int, bytes] = {}

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._hf.to_str(), n_vocab=self.vocab_size,
                        eos_token=self._eos or None)
        return self._tokenizer

    def matchers(self, grammar: str, count: int, *, param: str) -> list[Matcher]:
        """Compile `grammar` once and start `count` matchers on it (copies: a copy costs
        microseconds, a compile up to the schema budget); raise InvalidInput naming `param`
        with llguidance's reason. Blocking: call it off the event loop."""
        m = llguidance.LLMatcher(self.tokenizer, grammar, limits=limits(), log_level=0)
        if m.is_error():
            raise InvalidInput(f"{param} cannot be used: {m.get_error()}", param=param)
        first = self.fill([m])[0]  # here, not on the device thread
        if m.is_error():
            raise InvalidInput(f"{param} cannot be used: the grammar cannot start: "
                               f"{m.get_error()}", param=param)
        return [Matcher(m if i == 0 else m.deep_copy(), first if i == 0 else first.copy())
                for i in range(count)]

    def fill(self, matchers: list[llguidance.LLMatcher]) -> npt.NDArray[np.bool_]:
        """The allowed tokens of each matcher's next step, one row each (filled in
        parallel), `[len(matchers), vocab_size]`."""
        bits = llnp.allocate_token_bitmask(len(matchers), self.vocab_size)
        if len(matchers) == 1:
            llnp.fill_next_token_bitmask(matchers[0], bits, 0)
        else:
            llnp.fill_next_token_bitmask_par(self._executor,
                                             [(m, i) for i, m in enumerate(matchers)], bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little",
                                count=self.vocab_size)
        return allowed.view(np.bool_)  # 0/1 bytes: a view, no copy

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for (a piece of a UTF-8 character, possibly)."""
        got = self._bytes.get(token)
        if got is None:
            got = bytes(self.tokenizer.decode_bytes([token]))
            if len(self._bytes) < 1 << 17:
                self._bytes[token] = got
        return got
