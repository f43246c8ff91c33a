"""Chat completions service: turns a parsed request into engine calls and OpenAI objects.

It knows the shape of `chat.completion` and `chat.completion.chunk` objects; it does not know
about HTTP or SSE framing (see `routes/chat.py` and `sse.py`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio

from inference.chat.engine import ChatDelta
from inference.chat.sampling import SamplingParams
from inference.errors import InferenceError
from server.errors import APIError, to_api_error
from server.metrics import MeteredStream, Metrics
from server.protocol import ChatCompletionRequest, parse_model
from server.registry import ModelRegistry


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


@dataclass
class ChunkWriter:
    """Builds the `chat.completion.chunk` objects of one streamed response."""

    model: str
    include_usage: bool  # every chunk then carries "usage": null, as OpenAI sends it
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.model,
                                 "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role(self, index: int = 0) -> dict[str, Any]:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def deltas(self, delta: ChatDelta) -> list[dict[str, Any]]:
        """The chunks for one engine delta: its text, then the finish chunk if it is last."""
        out = []
        if delta.text:
            out.append(self._chunk([{"index": delta.index, "delta": {"content": delta.text},
                                     "logprobs": None, "finish_reason": None}]))
        if delta.finish_reason is not None:
            out.append(self._chunk([{"index": delta.index, "delta": {}, "logprobs": None,
                                     "finish_reason": delta.finish_reason}]))
        return out

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        """The last chunk: no choices, the usage of every choice together."""
        last = self._chunk([])
        last["usage"] = _usage(prompt, completion)
        return last


# What `ChatService.events` yields: a chunk, None when the generation was silent for the
# idle interval (SSE sends a ping), or the error that ended it after streaming began.
Event = dict[str, Any] | APIError | None


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return not chunk["choices"]


class ChatService:
    """Serves `/v1/chat/completions` from the registry's engines."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, *, max_messages: int = 2048,
                 max_tokens_limit: int = 4096) -> None:
        self._registry = registry
        self._metrics = metrics
        self._max_messages = max_messages
        self._max_tokens_limit = max_tokens_limit

    def parse(self, body: dict[str, Any]) -> ChatCompletionRequest:
        """Validate a decoded request body. Messages and content parts are counted first:
        validation costs event-loop time per item (0.4 s for 4 MiB of tiny messages)."""
        messages = body.get("messages")
        if isinstance(messages, list):
            if len(messages) > self._max_messages:
                raise APIError(413, f"{len(messages)} messages; this server accepts at most "
                               f"{self._max_messages} per request", param="messages",
                               code="too_many_messages")
            parts = sum(len(m["content"]) for m in messages
                        if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > self._max_messages:
                raise APIError(413, f"{parts} content parts; this server accepts at most "
                               f"{self._max_messages} per request", param="messages",
                               code="too_many_content_parts")
        return parse_model(ChatCompletionRequest, body)

    async def start(self, req: ChatCompletionRequest, endpoint: str) -> MeteredStream:
        """Queue a parsed request. Every error is raised here, before any response."""
        req.check_supported()
        limit = req.completion_limit()
        if limit is not None and limit > self._max_tokens_limit:
            raise APIError(400, f"max_tokens {limit} exceeds this server's limit of "
                           f"{self._max_tokens_limit}", param="max_tokens",
                           code="max_tokens_too_large")
        engine = self._registry.chat_engine(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        default = engine.sampling_defaults
        params = SamplingParams(
            temperature=default.temperature if req.temperature is None else req.temperature,
            top_p=default.top_p if req.top_p is None else req.top_p,
            top_k=default.top_k if req.top_k is None else req.top_k, seed=req.seed,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            max_tokens=req.completion_limit(), stop=req.stop_list(),
            logit_bias=req.logit_bias_pairs())
        stream = await engine.start(messages, params, n=req.n)
        return MeteredStream(stream, self._metrics, req.model, endpoint)

    async def events(self, req: ChatCompletionRequest, stream: MeteredStream, *,
                     include_usage: bool, idle_s: float | None = None
                     ) -> AsyncGenerator[Event, None]:
        """The one loop that reads a generation, for every transport: the role chunk of each
        choice, then content and finish chunks as they are decoded, then one usage chunk
        (choices empty). Closing the iterator, by cancellation too, stops the generation."""
        writer = ChunkWriter(model=req.model, include_usage=include_usage)
        async with stream:
            for index in range(stream.choices):
                yield writer.role(index)
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
                for chunk in writer.deltas(item):
                    yield chunk
        yield writer.usage(stream.prompt_tokens, stream.completion_tokens)

    async def complete(self, req: ChatCompletionRequest, stream: MeteredStream
                       ) -> dict[str, Any]:
        """Run a non-streamed request to the end and build its `chat.completion` from the
        same chunks a stream gets."""
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        usage: dict[str, int] = {}
        async for event in self.events(req, stream, include_usage=False):
            if isinstance(event, APIError):
                raise event
            if event is None:
                continue
            if is_usage_chunk(event):
                usage = event["usage"]
            for choice in event["choices"]:
                texts.setdefault(choice["index"], []).append(
                    choice["delta"].get("content") or "")
                if choice["finish_reason"] is not None:
                    finish[choice["index"]] = choice["finish_reason"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": req.model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant",
                                                 "content": "".join(texts[i])},
                         "logprobs": None, "finish_reason": finish[i]} for i in sorted(texts)],
            "usage": usage,
        }


async def _next(stream: MeteredStream) -> ChatDelta | APIError | None:
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return None
    except InferenceError as exc:
        return to_api_error(exc)
