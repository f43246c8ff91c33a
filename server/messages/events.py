"""Anthropic's Messages stream and message object, translated from the chat-completion
chunks of the one generation loop.

The stream: `message_start`; per content block `content_block_start`, its deltas
(`text_delta`, or `input_json_delta` for a tool use), `content_block_stop`; then
`message_delta` (stop reason, stop sequence, usage) and `message_stop`. A silence while the
request waits or decodes sends `ping`; an error after the stream began sends `error`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.core.errors import APIError, anthropic_error
from server.core.streaming import Event
from server.openai.chunks import is_usage_chunk

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass
class MessageWriter:
    """Turns one generation's chat chunks into Messages events; `message` is the object as it
    stands (complete after `message_stop`)."""

    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: new_id("msg"))
    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    failure: APIError | None = None
    _open: dict[str, Any] | None = None
    _json: list[str] = field(default_factory=list)  # the open tool use's input, as written

    def __post_init__(self) -> None:
        self.usage = _usage(self.prompt_tokens, 0, 0)

    @property
    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": self.content, "stop_reason": self.stop_reason,
                "stop_sequence": self.stop_sequence, "usage": self.usage}

    async def translate(self, chunks: AsyncGenerator[Event, None]
                        ) -> AsyncGenerator[dict[str, Any], None]:
        """Every event of the message. Closing this closes `chunks`, which stops the
        generation."""
        try:
            yield {"type": "message_start", "message": {**self.message, "content": []}}
            finish = "stop"
            async for chunk in chunks:
                if chunk is None:
                    yield {"type": "ping"}
                    continue
                if isinstance(chunk, APIError):
                    self.failure = chunk
                    yield anthropic_error(chunk)[1]
                    return
                if is_usage_chunk(chunk):
                    used = chunk["usage"]
                    cached = used["prompt_tokens_details"]["cached_tokens"]
                    self.usage = _usage(used["prompt_tokens"], used["completion_tokens"],
                                        cached)
                    continue
                for choice in chunk["choices"]:
                    for event in self._choice(choice):
                        yield event
                    if choice["finish_reason"] is not None:
                        finish = choice["finish_reason"]
                        self.stop_sequence = choice.get("stop_sequence")
            for event in self._close():
                yield event
            self.stop_reason = "stop_sequence" if self.stop_sequence is not None else \
                STOP_REASONS.get(finish, "end_turn")
            yield {"type": "message_delta",
                   "delta": {"stop_reason": self.stop_reason,
                             "stop_sequence": self.stop_sequence},
                   "usage": self.usage}
            yield {"type": "message_stop"}
        finally:
            await chunks.aclose()

    def _choice(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        delta = choice["delta"]
        out: list[dict[str, Any]] = []
        text = delta.get("content")
        if text:
            if self._open is None or self._open["type"] != "text":
                out += self._close()
                out += self._start({"type": "text", "text": ""})
            assert self._open is not None
            self._open["text"] += text
            out.append({"type": "content_block_delta", "index": len(self.content) - 1,
                        "delta": {"type": "text_delta", "text": text}})
        for piece in delta.get("tool_calls", ()):
            if "id" in piece:
                out += self._close()
                out += self._start({"type": "tool_use", "id": new_id("toolu"),
                                    "name": piece["function"]["name"], "input": {}})
            arguments = piece["function"].get("arguments", "")
            if arguments:
                self._json.append(arguments)
                out.append({"type": "content_block_delta", "index": len(self.content) - 1,
                            "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        self._open = block
        self.content.append(block)
        self._json = []
        return [{"type": "content_block_start", "index": len(self.content) - 1,
                 "content_block": dict(block)}]

    def _close(self) -> list[dict[str, Any]]:
        block, self._open = self._open, None
        if block is None:
            return []
        if block["type"] == "tool_use":
            written = "".join(self._json)
            block["input"] = orjson.loads(written) if written else {}
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]


def _usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` are those read afresh; those the prompt cache
    supplied are `cache_read_input_tokens`."""
    return {"input_tokens": prompt - cached, "output_tokens": output,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
