"""One generation (a request: its prompts, `n` choices each) and each choice's decoding state.

A `Choice` owns what must stay per sequence however it is batched: its sampler (and RNG), its
detokenizer, its stop matcher and its row of the KV pool. The scheduler (`engine.py`) decides
when each choice runs; this module only turns a logits row into the choice's next delta.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from anyio.streams.memory import MemoryObjectSendStream

from inference.chat.detokenizer import IncrementalDetokenizer
from inference.chat.grammar import Matcher
from inference.chat.model import ChatModel
from inference.chat.sampling import Sampler, SamplingParams, TokenLogprob
from inference.chat.stops import StopMatcher
from inference.errors import InferenceError

log = logging.getLogger(__name__)
State = Literal["prefill", "follow", "decode", "done"]


@dataclass(frozen=True)
class ChatDelta:
    """Text produced by one step of one choice; its last delta has `finish_reason`."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # the choice, for n > 1
    cached_tokens: int = 0  # prompt tokens this choice took from the prompt cache
    logprobs: tuple[LoggedToken, ...] = ()  # the step's sampled token, when asked for
    stop_sequence: str | None = None  # on the last delta: the stop string that ended it


@dataclass(frozen=True)
class LoggedToken:
    """A sampled token's log-probability and its top alternatives, with their bytes."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


class Generation:
    """One request: its prompts (a chat has one; a legacy completion may have several), `n`
    choices for each, and the stream its consumer reads. Choice `p * n + j` is the j-th
    answer to prompt p; the choices of one prompt share its prefill."""

    def __init__(self, model: ChatModel, prompts: list[list[int]], params: SamplingParams,
                 max_tokens: int, n: int,
                 send: MemoryObjectSendStream[ChatDelta | InferenceError],
                 matchers: list[Matcher] | None = None, cache_scope: str = "") -> None:
        """`matchers`, for a constrained generation: one per choice. `cache_scope`: whose
        prompt-cache entries it may reuse and leaves (see prompt_cache)."""
        self.prompts = prompts
        self.cache_scope = cache_scope
        self.weight = 1.0  # its tenant's share of the fair queue (inference/fair.py)
        self.max_tokens = max_tokens
        # The device thread's (see inference.chat.engine: ownership)
        self.emitted = 0  # deltas emitted
        self.paused_at: float | None = None  # since when it waits for its reader
        self.cancelled = False  # a cancel or stop-all command reached it
        self.stop_error: InferenceError | None = None  # what its consumer is told then
        # The event loop's
        self.send = send
        self.received = 0  # deltas the consumer took (the device thread reads it, only)
        self.ended = False  # the consumer has been told the end
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.choices = [Choice(self, model, params, prompt, p * n + j, j)
                        for p, prompt in enumerate(prompts) for j in range(n)]
        for choice, matcher in zip(self.choices, matchers or (), strict=False):
            choice.matcher = matcher

    @property
    def prompt_tokens(self) -> int:
        """Every prompt's tokens, each counted once (as OpenAI counts them)."""
        return sum(len(p) for p in self.prompts)

    @property
    def finished(self) -> bool:
        return all(c.state == "done" for c in self.choices)


class Choice:
    """One sequence: a row of the pool, a sampler, a detokenizer and a stop matcher."""

    def __init__(self, generation: Generation, model: ChatModel, params: SamplingParams,
                 prompt: list[int], index: int, sibling: int) -> None:
        self.generation = generation
        self.prompt = prompt
        self.index = index
        self.row = -1  # set when admitted
        self.fed = 0  # prompt tokens written to the row (the first sibling prefills them)
        # the first answer to a prompt prefills it; its siblings copy its row and sample from
        # its logits
        self.state: State = "prefill" if sibling == 0 else "follow"
        self.last = -1  # the token to feed next
        self.completion_tokens = 0
        self.looked_up = False  # the prompt cache was asked for this prompt
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.failed = False
        self.matcher: Matcher | None = None  # the grammar this choice's tokens must follow
        self._guide = model.guide
        self._eos = model.spec.eos_token_ids
        self._context = model.spec.context_length
        self._sampler = Sampler(params, model.vocab_size, stream=sibling)
        self._detok = IncrementalDetokenizer(model.tokenizer, prompt)
        self._stops = StopMatcher(params.stop)

    @property
    def reservation(self) -> int:
        """KV positions this choice may fill: its prompt, then every completion token but the
        last (which is sampled, never fed back)."""
        return len(self.prompt) + self.generation.max_tokens

    def start_at(self, cached: int) -> None:
        """The prompt cache was asked: the first `cached` prompt tokens are in the row."""
        self.looked_up = True
        self.fed = self.cached = cached

    def next_chunk(self, size: int) -> list[int]:
        """The next prompt tokens to prefill."""
        ids = self.prompt[self.fed:self.fed + size]
        self.fed += len(ids)
        return ids

    @property
    def prompt_done(self) -> bool:
        return self.fed >= len(self.prompt)

    def siblings(self) -> list[Choice]:
        """The other answers to this choice's prompt (they follow its prefill)."""
        return [c for c in self.generation.choices if c.prompt is self.prompt and c is not self]

    def advance(self, logits: npt.NDArray[np.float32],
                allowed: npt.NDArray[np.bool_] | None = None) -> ChatDelta:
        """Sample the next token from this choice's logits (only `allowed` tokens, under a
        grammar) and turn it into a delta. A finished grammar ends the choice with "stop"; one
        that ended in error (its masks allow only valid tokens: never expected) ends it with
        "length", since the answer is incomplete, and is logged."""
        token = self._sampler.sample(logits, allowed)
        if self.matcher is not None:
            self.matcher.consume(token)
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
            elif self.matcher is not None and self.matcher.done:
                text += self._drain()
                finish = "stop"
                if self.matcher.error:
                    log.warning("a constrained answer ended incomplete (finish_reason length): "
                                "the grammar ended in error: %s", self.matcher.error)
                    finish = "length"
            elif (self.completion_tokens >= gen.max_tokens
                  or len(self.prompt) + self.completion_tokens >= self._context):
                text += self._drain()
                finish = "stop" if self._stops.stopped else "length"
        if finish is not None:
            self.state = "done"
        logged = self._sampler.last
        return ChatDelta(text, finish, len(self.prompt), self.completion_tokens, self.index,
                         self.cached, () if logged is None or token in self._eos
                         else (self._log(logged),),
                         self._stops.matched if finish is not None else None)

    def _log(self, logged: TokenLogprob) -> LoggedToken:
        return LoggedToken(self._guide.token_bytes(logged.token), logged.logprob,
                           tuple((self._guide.token_bytes(t), lp) for t, lp in logged.top))

    def _drain(self) -> str:
        return self._stops.push(self._detok.flush()) + self._stops.flush()
