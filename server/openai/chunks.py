"""OpenAI's chunk shapes (`chat.completion.chunk`, `text_completion`), the usage and
log-probability objects, and whole answers assembled from the chunks (`collect`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from inference.chat.sequence import ChatDelta, LoggedToken
from server.core.errors import APIError
from server.core.streaming import Event
from server.openai.tools import ToolCallParser


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached` prompt tokens came from the prompt cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class _Writer:
    model: str
    include_usage: bool  # every chunk then carries "usage": null, as OpenAI sends it
    object: str = ""
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                                 "model": self.model, "system_fingerprint": None,
                                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, prompt: int, completion: int, cached: int) -> dict[str, Any]:
        """The last chunk: no choices, the usage of every choice together."""
        last = self._chunk([])
        last["usage"] = usage(prompt, completion, cached)
        return last


def logprob_entry(token: LoggedToken) -> dict[str, Any]:
    """OpenAI's `logprobs.content` entry for one token."""
    return {**_token(token.token, token.logprob),
            "top_logprobs": [_token(b, lp) for b, lp in token.top]}


def _token(raw: bytes, logprob: float) -> dict[str, Any]:
    # a token may hold part of a UTF-8 character: its text then shows the bytes escaped
    return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": logprob,
            "bytes": list(raw)}


@dataclass
class ChatChunks(_Writer):
    """`chat.completion.chunk` objects: a role chunk per choice, then content (or tool-call)
    deltas, with their tokens' log-probabilities when asked for."""

    object: str = "chat.completion.chunk"
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    logprobs: bool = False
    tools: str | None = None  # the ToolCallParser mode: "auto" or "calls"; None: text only
    # for protocols that report it (the Messages API): the finish chunk's choice names the
    # stop string that ended it, as "stop_sequence" (never on OpenAI's wire)
    stop_sequences: bool = False
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                for i in range(choices)]

    def deltas(self, delta: ChatDelta) -> list[dict[str, Any]]:
        """The chunks for one engine delta: its text (or tool-call pieces), then the finish
        chunk if it is last."""
        text, calls = delta.text, list[dict[str, Any]]()
        parser = None
        if self.tools is not None:
            parser = self._parsers.setdefault(delta.index, ToolCallParser(self.tools))
            text, calls = parser.feed(text)
            if delta.finish_reason is not None:
                text += parser.finish()
        logprobs = {"content": [logprob_entry(t) for t in delta.logprobs], "refusal": None} \
            if self.logprobs and delta.logprobs else None
        out = []
        if text or calls or logprobs:
            body: dict[str, Any] = {"content": text} if text or not calls else {}
            if calls:
                body["tool_calls"] = calls
            out.append(self._chunk([{"index": delta.index, "delta": body,
                                     "logprobs": logprobs, "finish_reason": None}]))
        if delta.finish_reason is not None:
            finish = delta.finish_reason
            if parser is not None and parser.calls and finish == "stop":
                finish = "tool_calls"
            last = {"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": finish}
            if self.stop_sequences:
                last["stop_sequence"] = delta.stop_sequence
            out.append(self._chunk([last]))
        return out


@dataclass
class CompletionChunks(_Writer):
    """Legacy `text_completion` objects: text deltas, the last with its finish reason."""

    object: str = "text_completion"
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    echo: list[str] = field(default_factory=list)  # per choice: its prompt, sent first

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return [self._chunk([{"index": i, "text": text, "logprobs": None,
                              "finish_reason": None}]) for i, text in enumerate(self.echo)]

    def deltas(self, delta: ChatDelta) -> list[dict[str, Any]]:
        if not delta.text and delta.finish_reason is None:
            return []
        return [self._chunk([{"index": delta.index, "text": delta.text, "logprobs": None,
                              "finish_reason": delta.finish_reason}])]


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return not chunk["choices"]


async def without_usage(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """`events` less the usage chunk (a stream that did not ask for it). Closing this closes
    `events`."""
    try:
        async for event in events:
            if not (isinstance(event, dict) and is_usage_chunk(event)):
                yield event
    finally:
        await events.aclose()


@dataclass
class Collected:
    """A whole generation, assembled from its chunks (`collect`)."""

    texts: dict[int, str]
    finish: dict[int, str]
    usage: dict[str, Any]
    tool_calls: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


async def collect(chunks: AsyncGenerator[Event, None], text_of: str) -> Collected:
    """Read `events` to the end for a non-streamed answer; raises the error that ended it.
    `text_of` names where a choice's text sits: "delta" (chat) or "text" (completions)."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    used: dict[str, Any] = {}
    calls: dict[int, list[dict[str, Any]]] = {}
    logprobs: dict[int, list[dict[str, Any]]] = {}
    async for event in chunks:
        if isinstance(event, APIError):
            raise event
        if event is None:
            continue
        if is_usage_chunk(event):
            used = event["usage"]
        for choice in event["choices"]:
            index = choice["index"]
            text = choice["delta"].get("content") if text_of == "delta" else choice["text"]
            texts.setdefault(index, []).append(text or "")
            if choice["finish_reason"] is not None:
                finish[index] = choice["finish_reason"]
            if choice["logprobs"] is not None:
                logprobs.setdefault(index, []).extend(choice["logprobs"]["content"])
            for piece in choice.get("delta", {}).get("tool_calls", ()):
                made = calls.setdefault(index, [])
                if "id" in piece:  # a call's first fragment
                    made.append({"id": piece["id"], "type": "function",
                                 "function": dict(piece["function"])})
                else:
                    made[piece["index"]]["function"]["arguments"] += \
                        piece["function"]["arguments"]
    return Collected({i: "".join(t) for i, t in sorted(texts.items())}, finish, used, calls,
                     logprobs)


