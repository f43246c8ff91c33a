"""The Responses API's stream, translated from the chat-completion chunks of the one
generation loop (`server.openai.chat.ChatService.events`).

Events come in the order the SDKs' stream helpers accumulate them: `response.created`,
`response.in_progress`; per output item `response.output_item.added`, its content part or
argument deltas, their `.done` events, `response.output_item.done`; then
`response.completed`, `response.incomplete` (max_output_tokens reached) or `response.failed`
(an error after the stream began). Every event carries its `sequence_number`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from server.core.errors import APIError
from server.core.streaming import Event
from server.openai.chunks import is_usage_chunk
from server.responses.wire import new_id


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


@dataclass
class _Open:
    """The output item being written."""

    index: int
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ResponseWriter:
    """Turns one generation's chat chunks into Responses events; `response` is the object
    as it stands (complete once the last event is out)."""

    echo: dict[str, Any]  # the request's settings, repeated in the response
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    status: str = "in_progress"
    error: dict[str, Any] | None = None
    incomplete: dict[str, Any] | None = None
    used: dict[str, Any] | None = None
    failure: APIError | None = None  # the error that ended a failed response
    _seq: int = 0
    _open: _Open | None = None
    _calls: dict[int, _Open] = field(default_factory=dict)  # chat call index -> its item

    @property
    def response(self) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": self.status, "error": self.error,
                "incomplete_details": self.incomplete, **self.echo,
                "output": self.output, "usage": self.used}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self, kind: str) -> dict[str, Any]:
        # a copy: the object goes on changing after the event is out
        return self._event(kind, response={**self.response, "output": list(self.output)})

    def opening(self) -> list[dict[str, Any]]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    async def translate(self, chunks: AsyncGenerator[Event, None]
                        ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """Every event of the response, from the chat chunks of its generation. Closing this
        closes `chunks`, which stops the generation."""
        try:
            for event in self.opening():
                yield event
            finish = "stop"
            async for chunk in chunks:
                if chunk is None:
                    yield None  # a silence: SSE sends a ping
                    continue
                if isinstance(chunk, APIError):
                    for event in self._close_all():
                        yield event
                    self.status, self.failure = "failed", chunk
                    self.error = {"code": chunk.code or chunk.type, "message": chunk.message}
                    yield self._snapshot("response.failed")
                    return
                if is_usage_chunk(chunk):
                    counted = chunk["usage"]
                    self.used = usage(counted["prompt_tokens"], counted["completion_tokens"],
                                      counted["prompt_tokens_details"]["cached_tokens"])
                    continue
                for choice in chunk["choices"]:
                    for event in self._choice(choice):
                        yield event
                    finish = choice["finish_reason"] or finish
            for event in self._close_all():
                yield event
            if not self.output:  # an empty answer is still a message
                for event in self._open_message():
                    yield event
                for event in self._close_all():
                    yield event
            if finish == "length":
                self.status = "incomplete"
                self.incomplete = {"reason": "max_output_tokens"}
                yield self._snapshot("response.incomplete")
            else:
                self.status = "completed"
                yield self._snapshot("response.completed")
        finally:
            await chunks.aclose()

    def _choice(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        delta = choice["delta"]
        out: list[dict[str, Any]] = []
        text = delta.get("content")
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        if text:
            if self._open is None or self._open.item["type"] != "message":
                out += self._close_all()
                out += self._open_message()
            current = self._open
            assert current is not None
            current.text.append(text)
            current.logprobs.extend(logprobs)
            out.append(self._event("response.output_text.delta", item_id=current.item["id"],
                                   output_index=current.index, content_index=0, delta=text,
                                   logprobs=logprobs))
        for piece in delta.get("tool_calls", ()):
            if "id" in piece:  # a new call
                out += self._close_all()
                item = {"type": "function_call", "id": new_id("fc"), "call_id": piece["id"],
                        "name": piece["function"]["name"], "arguments": "",
                        "status": "in_progress"}
                self._open = self._calls[piece["index"]] = _Open(len(self.output), item)
                self.output.append(item)
                out.append(self._event("response.output_item.added",
                                       output_index=self._open.index, item=dict(item)))
            call = self._calls[piece["index"]]
            arguments = piece["function"].get("arguments", "")
            if arguments:
                call.text.append(arguments)
                out.append(self._event("response.function_call_arguments.delta",
                                       item_id=call.item["id"], output_index=call.index,
                                       delta=arguments))
        return out

    def _open_message(self) -> list[dict[str, Any]]:
        item = {"type": "message", "id": new_id("msg"), "status": "in_progress",
                "role": "assistant", "content": []}
        self._open = _Open(len(self.output), item)
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=self._open.index,
                            item={**item, "content": []}),
                self._event("response.content_part.added", item_id=item["id"],
                            output_index=self._open.index, content_index=0,
                            part=_text_part("", []))]

    def _close_all(self) -> list[dict[str, Any]]:
        current, self._open = self._open, None
        if current is None:
            return []
        item, index, text = current.item, current.index, "".join(current.text)
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            part = _text_part(text, current.logprobs)
            item["content"] = [part]
            out += [self._event("response.output_text.done", item_id=item["id"],
                                output_index=index, content_index=0, text=text,
                                logprobs=current.logprobs),
                    self._event("response.content_part.done", item_id=item["id"],
                                output_index=index, content_index=0, part=part)]
        else:
            item["arguments"] = text
            out.append(self._event("response.function_call_arguments.done",
                                   item_id=item["id"], output_index=index, name=item["name"],
                                   arguments=text))
        out.append(self._event("response.output_item.done", output_index=index,
                               item=dict(item)))
        return out


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
