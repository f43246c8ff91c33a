"""One generation (a request, with its `n` choices) and each choice's decoding state.

A `Choice` owns what must stay per sequence however it is batched: its sampler (and RNG), its
detokenizer, its stop matcher and its row of the KV pool. The scheduler (`engine.py`) decides
when each choice runs; this module only turns a logits row into the choice's next delta.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from anyio.streams.memory import MemoryObjectSendStream

from inference.chat.detokenizer import IncrementalDetokenizer
from inference.chat.model import ChatModel
from inference.chat.sampling import Sampler, SamplingParams
from inference.chat.stops import StopMatcher
from inference.errors import InferenceError

State = Literal["prefill", "follow", "decode", "done"]


@dataclass(frozen=True)
class ChatDelta:
    """Text produced by one step of one choice; its last delta has `finish_reason`."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # the choice, for n > 1


class Generation:
    """One request: its prompt, its choices and the stream its consumer reads."""

    def __init__(self, model: ChatModel, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, n: int,
                 send: MemoryObjectSendStream[ChatDelta | InferenceError]) -> None:
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.send = send
        self.cancelled = False  # set by the consumer's side, or by stop_all
        self.stop_error: InferenceError | None = None  # what stop_all tells the consumer
        self.ended = False  # the consumer has been told the end
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.choices = [Choice(self, model, params, i) for i in range(n)]

    @property
    def reservation(self) -> int:
        """KV positions each choice may fill: the prompt, then every completion token but the
        last (which is sampled, never fed back)."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def finished(self) -> bool:
        return all(c.state == "done" for c in self.choices)


class Choice:
    """One sequence: a row of the pool, a sampler, a detokenizer and a stop matcher."""

    def __init__(self, generation: Generation, model: ChatModel, params: SamplingParams,
                 index: int) -> None:
        self.generation = generation
        self.index = index
        self.row = -1  # set when admitted
        self.fed = 0  # prompt tokens written to the row (the first choice prefills them)
        # the first choice prefills; the others copy its rows and sample from its logits
        self.state: State = "prefill" if index == 0 else "follow"
        self.last = -1  # the token to feed next
        self.completion_tokens = 0
        self._eos = model.spec.eos_token_ids
        self._context = model.spec.context_length
        self._sampler = Sampler(params, model.vocab_size, stream=index)
        self._detok = IncrementalDetokenizer(model.tokenizer, generation.prompt_ids)
        self._stops = StopMatcher(params.stop)

    def next_chunk(self, size: int) -> list[int]:
        """The next prompt tokens to prefill."""
        ids = self.generation.prompt_ids[self.fed:self.fed + size]
        self.fed += len(ids)
        return ids

    @property
    def prompt_done(self) -> bool:
        return self.fed >= len(self.generation.prompt_ids)

    def advance(self, logits: npt.NDArray[np.float32]) -> ChatDelta:
        """Sample the next token from this choice's logits and turn it into a delta."""
        token = self._sampler.sample(logits)
        self.last = token
        self.completion_tokens += 1
        self.state = "decode"
        gen = self.generation
        finish: str | None = None
        if token in self._eos:
            text = self._drain()
            finish = "stop"
        else:
            text = self._stops.push(self._detok.step(token))
            if self._stops.stopped:
                finish = "stop"
            elif (self.completion_tokens >= gen.max_tokens
                  or len(gen.prompt_ids) + self.completion_tokens >= self._context):
                text += self._drain()
                finish = "stop" if self._stops.stopped else "length"
        if finish is not None:
            self.state = "done"
        return ChatDelta(text, finish, len(gen.prompt_ids), self.completion_tokens, self.index)

    def _drain(self) -> str:
        return self._stops.push(self._detok.flush()) + self._stops.flush()
