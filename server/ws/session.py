"""The WebSocket protocol of `/v1/ws`: conversations multiplexed on one socket by client id.

Client → server (JSON text messages):
  {"type": "chat.create", "id": ID, "request": <body of /v1/chat/completions>}
  {"type": "chat.cancel", "id": ID}
  {"type": "embeddings.create", "id": ID, "request": <body of /v1/embeddings>}
  {"type": "ping"}
  {"type": "auth", "api_key": KEY}    first message, when keys are on and no header was sent;
                                      later ones are checked again, and a wrong key closes the
                                      socket (1008)
Server → client:
  {"type": "chat.delta", "id": ID, "chunk": <chat.completion.chunk, as over SSE>}
  {"type": "chat.done", "id": ID, "finish_reason": "stop"|"length"|"tool_calls"|"cancelled",
   "usage": {...}}
  {"type": "embeddings.result", "id": ID, "response": <body of /v1/embeddings>}
  {"type": "error", "id": ID|null, "error": <OpenAI error body's "error">}
  {"type": "pong"}, {"type": "auth.ok"}
A bad message gets an error event and the socket stays open. This module knows nothing of
Quart; the route gives it a bounded send queue and a task group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from inference.errors import InferenceError
from server.core.errors import (
    APIError,
    bad_request,
    internal_error,
    overloaded,
    to_api_error,
    too_large,
    unauthorized,
)
from server.core.metrics import MeteredStream
from server.core.tenant import OPEN, Tenant
from server.openai.chat import ChatService
from server.openai.chunks import is_usage_chunk, usage
from server.openai.embeddings import EmbeddingService
from server.tenants.service import Tenants

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SocketLimits:
    """Per socket, from Settings (`ws_max_message_bytes`, `ws_max_conversations`)."""

    max_message_bytes: int
    max_conversations: int


class AuthenticationFailed(Exception):
    """An `auth` message with a wrong key: the route sends `error` and closes with 1008."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def auth_message_key(raw: str | bytes) -> str | None:
    """The key of an {"type": "auth", "api_key": ...} message, else None."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(msg, dict) and msg.get("type") == "auth" and isinstance(msg.get("api_key"),
                                                                          str):
        return str(msg["api_key"])
    return None


class SocketSession:
    """One connection's conversations. `dispatch` handles one incoming message."""

    def __init__(self, chat: ChatService, embeddings: EmbeddingService,
                 outbox: MemoryObjectSendStream[dict[str, Any]], limits: SocketLimits,
                 tenants: Tenants | None = None, tenant: Tenant = OPEN,
                 key: str | None = None) -> None:
        """`tenant`: whose key (`key`) the socket authenticated with. A database key is
        checked again at every conversation, so a revoked one fails at its next."""
        self._chat = chat
        self._tenants = tenants
        self._tenant = tenant
        self._key = key
        self._embeddings = embeddings
        self._outbox = outbox
        self._send = outbox.send
        self._limits = limits
        self._active: dict[str, anyio.CancelScope] = {}

    @property
    def active(self) -> int:
        return len(self._active)

    async def dispatch(self, raw: str | bytes, tg: TaskGroup) -> None:
        """Handle one message. Raises `AuthenticationFailed` when the socket must close."""
        if len(raw) > self._limits.max_message_bytes:
            await self._error(None, too_large(
                f"message of {len(raw)} bytes exceeds the limit of "
                f"{self._limits.max_message_bytes}", code="message_too_large"))
            return
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self._error(None, bad_request(f"message is not valid JSON: {exc}"))
            return
        if not isinstance(msg, dict):
            await self._error(None, bad_request("message must be a JSON object"))
            return
        kind, cid = msg.get("type"), msg.get("id")
        if kind == "ping":
            await self._send({"type": "pong"})
            return
        if kind == "auth":  # already authenticated (by header or first message): check again
            key = msg.get("api_key")
            key = key if isinstance(key, str) else None
            granted = OPEN if self._tenants is None else await self._tenants.resolve(key)
            if granted is None:
                raise AuthenticationFailed(unauthorized(provided=True))
            self._tenant, self._key = granted, key  # later conversations run under it
            await self._send({"type": "auth.ok"})
            return
        if kind not in ("chat.create", "chat.cancel", "embeddings.create"):
            await self._error(cid if isinstance(cid, str) else None,
                              bad_request(f"unknown message type {kind!r}", param="type"))
            return
        if not isinstance(cid, str) or not 0 < len(cid) <= 128:
            await self._error(None, bad_request("id must be a string of 1 to 128 characters",
                                                param="id"))
            return
        if kind == "chat.cancel":
            scope = self._active.get(cid)
            if scope is None:
                await self._error(cid, bad_request(f"no active conversation {cid!r}",
                                                   param="id"))
            else:
                scope.cancel()
            return
        if cid in self._active:
            await self._error(cid, bad_request(f"id {cid!r} is already in use", param="id"))
            return
        if len(self._active) >= self._limits.max_conversations:
            await self._error(cid, overloaded(
                f"at most {self._limits.max_conversations} conversations per socket",
                retry_after_s=1.0, code="too_many_conversations"))
            return
        if self._tenants is not None:
            if self._tenant.key_id is not None \
                    and await self._tenants.resolve(self._key) is None:  # revoked
                raise AuthenticationFailed(unauthorized(provided=True))
            try:
                self._tenants.gate.check_request(self._tenant)
            except APIError as exc:
                await self._error(cid, exc)
                return
        request = msg.get("request")
        if not isinstance(request, dict):
            await self._error(cid, bad_request("request must be a JSON object",
                                               param="request"))
            return
        scope = anyio.CancelScope()
        self._active[cid] = scope
        run = self._run_chat if kind == "chat.create" else self._run_embeddings
        tg.start_soon(self._guarded, cid, scope, run, request)

    async def _guarded(self, cid: str, scope: anyio.CancelScope,
                       run: Callable[[str, dict[str, Any]], Awaitable[None]],
                       request: dict[str, Any]) -> None:
        try:
            with scope:
                await run(cid, request)
        except APIError as exc:
            await self._error(cid, exc)
        except InferenceError as exc:
            await self._error(cid, to_api_error(exc))
        except Exception:
            log.exception("websocket conversation %s failed", cid)
            await self._error(cid, internal_error())
        finally:
            self._active.pop(cid, None)

    async def _run_chat(self, cid: str, body: dict[str, Any]) -> None:
        req = self._chat.parse(body)
        stream: MeteredStream | None = None
        finish: list[str] = []
        done: dict[str, Any] | None = None
        try:
            stream = await self._chat.start(req, "ws", self._tenant)
            async with aclosing(self._chat.events(req, stream, include_usage=False)) as events:
                async for event in events:
                    if isinstance(event, APIError):
                        raise event
                    if event is None:
                        continue
                    if is_usage_chunk(event):
                        done = self._done(cid, finish[0] if finish else "stop", event["usage"])
                        continue
                    finish += [c["finish_reason"] for c in event["choices"]
                               if c["finish_reason"] is not None and c["index"] == 0]
                    await self._send({"type": "chat.delta", "id": cid, "chunk": event})
        except anyio.get_cancelled_exc_class():
            # chat.cancel, or the socket closing, at any point after chat.create (a request
            # still being tokenized or queued too): say so while the socket still listens.
            used = usage(0, 0) if stream is None else usage(
                stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await self._send_if_open(self._done(cid, "cancelled", used))
            raise
        assert done is not None
        await self._send(done)

    @staticmethod
    def _done(cid: str, finish: str, used: dict[str, Any]) -> dict[str, Any]:
        """`chat.done`: the first choice's finish reason and the usage of all choices."""
        return {"type": "chat.done", "id": cid, "finish_reason": finish, "usage": used}

    async def _run_embeddings(self, cid: str, body: dict[str, Any]) -> None:
        req = self._embeddings.parse(body)
        response = await self._embeddings.embed(req, self._tenant)
        await self._send({"type": "embeddings.result", "id": cid, "response": response})

    async def _send_if_open(self, message: dict[str, Any]) -> None:
        """Send unless the socket is gone."""
        try:
            await self._send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _error(self, cid: str | None, err: APIError) -> None:
        await self._send({"type": "error", "id": cid, "error": err.body()["error"]})
