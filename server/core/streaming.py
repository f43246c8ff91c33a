"""The one loop that reads a generation's stream, for every API surface and transport.

`events` serves SSE and non-streamed answers, the WebSocket, chat and legacy completions
alike: a `ChunkShape` (each protocol's own, e.g. `server.openai.chunks`) turns the engine's
deltas into that protocol's chunks, and transports only frame what `events` yields. Usage is
the stream's own count (`DeltaStream.completion_tokens`), whatever wraps it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import anyio

from inference.chat.sequence import ChatDelta
from inference.chat.stream import DeltaStream
from inference.errors import InferenceError
from server.core.errors import APIError, to_api_error

# What `events` yields: a chunk, None when the generation was silent for the idle interval
# (SSE sends a ping), or the error that ended it after streaming began.
Event = dict[str, Any] | APIError | None


class ChunkShape(Protocol):
    """A protocol's chunks: the opening ones, those of one delta, and the last (usage)."""

    def opening(self, choices: int) -> list[dict[str, Any]]: ...
    def deltas(self, delta: ChatDelta) -> list[dict[str, Any]]: ...
    def usage(self, prompt: int, completion: int, cached: int) -> dict[str, Any]: ...


async def events(stream: DeltaStream, shape: ChunkShape, *, idle_s: float | None = None
                 ) -> AsyncGenerator[Event, None]:
    """Chunks as the generation's choices decode, then one usage chunk (choices empty).
    Closing the iterator, by cancellation too, stops the generation."""
    async with stream:
        for chunk in shape.opening(stream.choices):
            yield chunk
        while True:
            item: ChatDelta | APIError | None = None
            with anyio.move_on_after(idle_s if idle_s is not None else math.inf) as idle:
                item = await _next(stream)
            if idle.cancelled_caught:
                yield None
                continue
            if item is None:
                break
            if isinstance(item, APIError):
                yield item
                return
            for chunk in shape.deltas(item):
                yield chunk
    yield shape.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)


async def _next(stream: DeltaStream) -> ChatDelta | APIError | None:
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return None
    except InferenceError as exc:
        return to_api_error(exc)
