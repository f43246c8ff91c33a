"""The decode scheduler: owns every prefill and decode step of one chat model.

Requests enter a bounded waiting queue; up to `max_running` sequences are decoded in turn, one
step each (round robin), each step off the event loop. A consumer that stops listening marks its
sequence cancelled and the scheduler drops it before its next step.
"""

from __future__ import annotations

import logging
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
        self.cancelled = False
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

    def _drain(self) -> str:
        return self._stops.push(self._detok.flush()) + self._stops.flush()


class GenerationStream:
    """The consumer's end of one generation: an async iterator of `ChatDelta`.

    Use it as an async context manager; leaving the block (including by cancellation) stops
    the generation at its next decode step.
    """

    def __init__(self, seq: _Sequence,
                 receive: MemoryObjectReceiveStream[ChatDelta | InferenceError]) -> None:
        self._seq = seq
        self._receive = receive
        self.prompt_tokens = len(seq.prompt_ids)

    async def receive(self) -> ChatDelta:
        """Next delta; raises `anyio.EndOfStream` after the last one. Safe to cancel."""
        item = await self._receive.receive()
        if isinstance(item, InferenceError):
            raise item
        return item

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> ChatDelta:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop listening; the scheduler drops the sequence before its next step."""
        self._seq.cancelled = True
        self._receive.close()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ChatEngine:
    """Schedules generations on one `ChatModel`. Call `run()` in a task group first."""

    def __init__(self, model: ChatModel, *, max_running: int = 8, max_waiting: int = 32) -> None:
        self.model = model
        self.model_id = model.spec.model_id
        self.stats = EngineStats()
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._running: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._device = anyio.CapacityLimiter(1)
        self._wakeup = anyio.Event()
        self._accepting = False

    @property
    def running(self) -> int:
        return len(self._running)

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
        if len(self._waiting) >= self._max_waiting:
            raise Overloaded(f"model {self.model_id} has {len(self._waiting)} requests waiting; "
                             "retry later", retry_after_s=1.0)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        send, receive = anyio.create_memory_object_stream[ChatDelta | InferenceError](
            max_buffer_size=max_tokens + 2)  # one item per step at most: bounded by max_tokens
        seq = _Sequence(self.model, prompt_ids, params, max_tokens, send)
        self._waiting.append(seq)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += len(prompt_ids)
        self._wakeup.set()
        return GenerationStream(seq, receive)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop. Runs until cancelled; then fails whatever is still queued.

        Use `await task_group.start(engine.run)`: it returns once the engine takes requests.
        """
        self._accepting = True
        task_status.started()
        try:
            while True:
                self._admit()
                if not self._running:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                seq = self._running.popleft()
                if seq.cancelled:
                    self._end(seq, cancelled=True)
                    continue
                await self._step(seq)
        finally:
            self._accepting = False
            for seq in (*self._running, *self._waiting):
                self._fail(seq, BackendUnavailable("the server is shutting down"))
            self._running.clear()
            self._waiting.clear()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._max_running:
            seq = self._waiting.popleft()
            if seq.cancelled:  # client left while queued: it never costs compute
                self._end(seq, cancelled=True)
            else:
                self._running.append(seq)

    async def _step(self, seq: _Sequence) -> None:
        try:
            delta = await anyio.to_thread.run_sync(seq.step, limiter=self._device)
        except Exception as exc:
            log.exception("decode step failed on %s", self.model_id)
            self.stats.failed_total += 1
            self._fail(seq, BackendUnavailable(f"inference failed: {exc}"))
            return
        self.stats.decode_steps_total += 1
        self.stats.generated_tokens_total += 1
        try:
            seq.send.send_nowait(delta)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._end(seq, cancelled=True)
            return
        if delta.finish_reason is not None:
            self._end(seq, cancelled=False)
        elif seq.cancelled:
            self._end(seq, cancelled=True)
        else:
            self._running.append(seq)

    def _end(self, seq: _Sequence, *, cancelled: bool) -> None:
        seq.cache = None
        seq.send.close()
        if cancelled:
            self.stats.cancelled_total += 1
        else:
            self.stats.completed_total += 1

    def _fail(self, seq: _Sequence, error: InferenceError) -> None:
        seq.cache = None
        try:
            seq.send.send_nowait(error)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
            pass
        seq.send.close()
