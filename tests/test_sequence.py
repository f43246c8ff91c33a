"""One choice's step: what its finish reason says when its grammar breaks."""

from __future__ import annotations

import logging

import anyio
import numpy as np
import pytest

from inference.chat.grammar import json_schema_grammar
from inference.chat.model import ChatModel
from inference.chat.sampling import SamplingParams
from inference.chat.sequence import ChatDelta, Generation
from inference.errors import InferenceError


def test_a_grammar_that_ends_in_error_does_not_say_stop(phi3: ChatModel,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    # Masks allow only valid tokens, so this is never expected; if it happens anyway, the
    # answer is incomplete: "length" (as for a cut-off answer), and the log says why.
    matcher = phi3.guide.matchers(json_schema_grammar({"type": "integer"}), 1, param="p")[0]
    send, receive = anyio.create_memory_object_stream[ChatDelta | InferenceError](4)
    gen = Generation(phi3, [[1, 2, 3]], SamplingParams(temperature=0), 8, 1, send, [matcher])
    logits = np.zeros(phi3.vocab_size, dtype=np.float32)
    logits[phi3.tokenizer.token_to_id("x")] = 10.0  # no integer starts with "x"
    with caplog.at_level(logging.WARNING):
        delta = gen.choices[0].advance(logits, allowed=None)  # the mask left out on purpose
    assert matcher.error and delta.finish_reason == "length"
    assert "ended incomplete" in caplog.text
    send.close()
    receive.close()
