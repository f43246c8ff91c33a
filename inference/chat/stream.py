"""The consumer's side of a generation: an async iterator of `ChatDelta`s.

`GenerationStream` is what `ChatEngine.start` returns; closing it (or leaving its `async with`)
stops the generation at its next step. `DeltaStream` is the protocol, so wrappers (metrics)
can stand in for it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from inference.chat.sequence import ChatDelta, Generation
from inference.errors import InferenceError


class DeltaStream:
    """An async iterator and context manager of `ChatDelta`s over `receive()` and `close()`:
    leaving the `async with` block, by cancellation too, closes the stream. It counts its own
    usage as deltas arrive."""

    prompt_tokens: int
    choices: int

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, every choice together."""
        raise NotImplementedError

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the prompt cache, every prompt together."""
        raise NotImplementedError

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
    """The consumer's end of one generation: the deltas of all its choices, interleaved.
    Closing it stops the generation at its next step."""

    def __init__(self, gen: Generation,
                 receive: MemoryObjectReceiveStream[ChatDelta | InferenceError],
                 cancel: Callable[[Generation], None]) -> None:
        """`cancel` tells the engine to stop `gen` (a command: see inference.chat.engine)."""
        self._gen = gen
        self._receive = receive
        self._cancel = cancel
        self.prompt_tokens = gen.prompt_tokens
        self.choices = len(gen.choices)
        self._completion = [0] * self.choices  # per choice, so far
        self._cached = [0] * self.choices  # per choice: prompt tokens from the prompt cache

    @property
    def completion_tokens(self) -> int:
        return sum(self._completion)

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached)

    @property
    def queue_seconds(self) -> float | None:
        """How long the request waited before it was admitted (None while it waits)."""
        if self._gen.admitted_at is None:
            return None
        return self._gen.admitted_at - self._gen.queued_at

    async def receive(self) -> ChatDelta:
        """Next delta; raises `anyio.EndOfStream` after the last one. Safe to cancel."""
        item = await self._receive.receive()
        if isinstance(item, InferenceError):
            raise item
        self._gen.received += 1  # a paused generation resumes once its reader catches up
        self._completion[item.index] = item.completion_tokens
        self._cached[item.index] = item.cached_tokens
        return item

    def close(self) -> None:
        """Stop listening; the scheduler drops the generation before its next step."""
        self._cancel(self._gen)
        self._receive.close()
