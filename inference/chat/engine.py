"""The decode scheduler: owns every prefill and decode step of one chat model.

Requests enter a bounded waiting queue; up to `max_running` sequences are decoded in turn, one
step each (round robin), on the device thread, off the event loop. A consumer that stops
listening marks its sequence cancelled and the scheduler drops it before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from inference.chat.detokenizer import IncrementalDetokenizer
from inference.chat.model import ChatModel, KVCache
from inference.chat.sampling import Sampler, SamplingParams
from inference.chat.stops import StopMatcher
from inference.errors import (
    BackendUnavailable,
    ContextTooLong,
    InferenceError,
    InvalidInput,
    Overloaded,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatDelta:
    """Text produced by one decode step; the last delta of a sequence has `finish_reason`."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EngineStats:
    """Monotonic counters, for /health and metrics."""

    requests_total: int = 0
    completed_total: int = 0
    cancelled_total: int = 0
    failed_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    decode_steps_total: int = 0


class _Sequence:
    """One generation in flight: cache, sampler, detokenizer, stop matcher and output stream."""

    def __init__(self, model: ChatModel, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, send: MemoryObjectSendStream[ChatDelta | InferenceError]
                 ) -> None:
        self.model = model
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.send = send
        self.cancelled = False  # set by the consumer's side, or by stop_all
        self.stop_error: InferenceError | None = None  # what to tell a consumer stop_all ended
        self.done = False  # set once, when the sequence needs no more steps
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.cache: KVCache | None = None
        self.completion_tokens = 0
        self._last = -1
        self._sampler = Sampler(params, model.vocab_size)
        self._detok = IncrementalDetokenizer(model.tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)

    def step(self) -> ChatDelta:
        """Prefill (first call) or decode one token. Blocking: runs in a worker thread."""
        if self.cache is None:
            self.cache = self.model.new_cache()
            logits = self.model.forward(self.cache, self.prompt_ids)
        else:
            logits = self.model.forward(self.cache, [self._last])
        token = self._sampler.sample(logits)
        self._last = token
        self.completion_tokens += 1
        finish: str | None = None
        if token in self.model.spec.eos_token_ids:
            text = self._drain()
            finish = "stop"
        else:
            text = self._stops.push(self._detok.step(token))
            if self._stops.stopped:
                finish = "stop"
            elif (self.completion_tokens >= self.max_tokens
                  or self.cache.length >= self.model.spec.context_length):
                text += self._drain()
                finish = "stop" if self._stops.stopped else "length"
        return ChatDelta(text, finish, len(self.prompt_ids), self.completion_tokens)

    def finish(self) -> None:
        """No more steps: release the KV cache."""
        self.done = True
        self.cache = None

    def _drain(self) -> str:
        return self._stops.push(self._detok.flush()) + self._stops.flush()


class DeltaStream:
    """An async iterator and context manager of `ChatDelta`s over `receive()` and `close()`:
    leaving the `async with` block, by cancellation too, closes the stream."""

    prompt_tokens: int

    async def receive(self) -> ChatDelta:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> ChatDelta:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> DeltaStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class GenerationStream(DeltaStream):
    """The consumer's end of one generation. Closing it stops the generation at its next
    decode step."""

    def __init__(self, seq: _Sequence,
                 receive: MemoryObjectReceiveStream[ChatDelta | InferenceError]) -> None:
        self._seq = seq
        self._receive = receive
        self.prompt_tokens = len(seq.prompt_ids)

    @property
    def queue_seconds(self) -> float | None:
        """How long the request waited before its first step (None while it waits)."""
        if self._seq.admitted_at is None:
            return None
        return self._seq.admitted_at - self._seq.queued_at

    async def receive(self) -> ChatDelta:
        """Next delta; raises `anyio.EndOfStream` after the last one. Safe to cancel."""
        item = await self._receive.receive()
        if isinstance(item, InferenceError):
            raise item
        return item

    def close(self) -> None:
        """Stop listening; the scheduler drops the sequence before its next step."""
        self._seq.cancelled = True
        self._receive.close()


class ChatEngine:
    """Schedules generations on one `ChatModel`. Call `run()` in a task group first.

    Decoding happens in rounds on the device thread: each round steps the running sequences in
    turn and posts every delta to the event loop without waiting for it, so per-token HTTP work
    never sits between two decode steps. A round ends when a request arrives (to admit it), when
    every sequence in it is done, or after `round_s`, so shutdown never waits long.
    Runs on asyncio (which Quart and Hypercorn use).
    """

    def __init__(self, model: ChatModel, *, max_running: int = 8, max_waiting: int = 16,
                 round_s: float = 0.25, default_max_tokens: int | None = None) -> None:
        self.model = model
        self.model_id = model.spec.model_id
        self.stats = EngineStats()
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._round_s = round_s
        self._default_max_tokens = default_max_tokens  # when a request sets none
        self._running: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()
        self._device = anyio.CapacityLimiter(1)
        self._wakeup = anyio.Event()
        self._arrival = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False

    @property
    def running(self) -> int:
        """Sequences admitted and not yet finished."""
        return sum(not s.done for s in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def start(self, messages: list[dict[str, str]], params: SamplingParams
                    ) -> GenerationStream:
        """Queue a generation. Raises before anything streams if it cannot be served."""
        if not self._accepting:
            raise BackendUnavailable(f"model {self.model_id} is not running")
        if not messages:
            raise InvalidInput("messages must not be empty", param="messages")
        for token, _ in params.logit_bias:
            if token >= self.model.vocab_size:
                raise InvalidInput(f"logit_bias names token {token}; this model's vocabulary "
                                   f"has {self.model.vocab_size} tokens", param="logit_bias")
        self._check_queue()  # before tokenizing: an overloaded server refuses cheaply
        prompt_ids = await anyio.to_thread.run_sync(self.model.encode_prompt, messages)
        context = self.model.spec.context_length
        if len(prompt_ids) >= context:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens, but the messages "
                f"take {len(prompt_ids)} tokens", param="messages")
        room = context - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens; the messages take "
                f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more",
                param="max_tokens")
        self._check_queue()  # again: others may have queued while this prompt was tokenized
        max_tokens = params.max_tokens if params.max_tokens is not None else \
            min(room, self._default_max_tokens or room)
        send, receive = anyio.create_memory_object_stream[ChatDelta | InferenceError](
            max_buffer_size=max_tokens + 2)  # one item per step at most: bounded by max_tokens
        seq = _Sequence(self.model, prompt_ids, params, max_tokens, send)
        self._waiting.append(seq)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += len(prompt_ids)
        self._arrival.set()
        self._wakeup.set()
        return GenerationStream(seq, receive)

    def _check_queue(self) -> None:
        if len(self._waiting) >= self._max_waiting:
            raise Overloaded(f"model {self.model_id} has {len(self._waiting)} requests waiting; "
                             "retry later", retry_after_s=1.0)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop. Runs until cancelled; then fails whatever is still queued.

        Use `await task_group.start(engine.run)`: it returns once the engine takes requests.
        """
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        task_status.started()
        try:
            while True:
                self._admit()
                if not self._running:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                self._arrival.clear()
                await anyio.to_thread.run_sync(self._decode_round, list(self._running),
                                               limiter=self._device)
                self._running = [s for s in self._running if not s.done]
        finally:
            self._accepting = False
            for seq in (*self._running, *self._waiting):
                if not seq.done:
                    self._deliver(seq, BackendUnavailable("the server is shutting down"),
                                  "failed")
            self._running.clear()
            self._waiting.clear()

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.running

    def stop_all(self, error: InferenceError) -> None:
        """End every generation at its next step, telling each consumer `error`; refuse new
        ones. For shutdown, after the grace period."""
        self._accepting = False
        for seq in self._running:
            if not seq.done:
                seq.stop_error = error
                seq.cancelled = True
        while self._waiting:
            self._deliver(self._waiting.popleft(), error, "failed")
        self._arrival.set()  # end the current round at its next step

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._max_running:
            seq = self._waiting.popleft()
            if seq.cancelled:  # client left while queued: it never costs compute
                self._end(seq, "cancelled")
            else:
                seq.admitted_at = time.monotonic()
                self._running.append(seq)

    def _decode_round(self, batch: list[_Sequence]) -> None:
        """Device thread: step each live sequence in turn until the round ends."""
        loop = self._loop
        assert loop is not None
        post = loop.call_soon_threadsafe
        deadline = time.monotonic() + self._round_s
        live = [s for s in batch if not s.done]
        while live and not self._arrival.is_set() and time.monotonic() < deadline:
            for seq in live:
                if seq.cancelled:
                    seq.finish()
                    if seq.stop_error is not None:  # ended by stop_all: say why
                        post(self._deliver, seq, seq.stop_error, "cancelled")
                    else:
                        post(self._end, seq, "cancelled")
                    continue
                try:
                    delta = seq.step()
                except Exception as exc:
                    log.exception("decode step failed on %s", self.model_id)
                    seq.finish()
                    post(self._deliver, seq, BackendUnavailable(f"inference failed: {exc}"),
                         "failed")
                    continue
                if delta.finish_reason is not None:
                    seq.finish()
                    post(self._deliver, seq, delta, "completed")
                else:
                    post(self._deliver, seq, delta, None)
            live = [s for s in live if not s.done]

    def _deliver(self, seq: _Sequence, item: ChatDelta | InferenceError,
                 outcome: str | None) -> None:
        """Event loop: hand one item to the consumer; with `outcome`, also end the sequence."""
        if isinstance(item, ChatDelta):
            self.stats.decode_steps_total += 1
            self.stats.generated_tokens_total += 1
        try:
            seq.send.send_nowait(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
            seq.cancelled = True  # the consumer is gone: the next step drops the sequence
        if outcome is not None:
            self._end(seq, outcome)

    def _end(self, seq: _Sequence, outcome: str) -> None:
        seq.finish()
        seq.send.close()
        if outcome == "cancelled":
            self.stats.cancelled_total += 1
        elif outcome == "failed":
            self.stats.failed_total += 1
        else:
            self.stats.completed_total += 1
