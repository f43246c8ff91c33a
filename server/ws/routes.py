"""`/v1/ws`: the WebSocket endpoint. One task receives, one sends, and each conversation runs
in its own task, all in one task group per connection; closing the socket cancels them all."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream
from quart import Blueprint, g, websocket

from server.core.errors import unauthorized
from server.core.state import app_state
from server.core.tenant import Tenant
from server.openai.services import services
from server.tenants.service import Tenants
from server.ws.session import AuthenticationFailed, SocketLimits, SocketSession, auth_message_key

bp = Blueprint("ws", __name__)
AUTH_TIMEOUT_S = 10.0


@bp.websocket("/v1/ws")
async def chat_socket() -> None:
    state = app_state()
    settings = state.settings
    await websocket.accept()
    tenants = state.tenants
    tenant, key = g.ws_tenant, g.ws_key
    if tenant is None:
        tenant, key = await _authenticate(tenants)
        if tenant is None:
            return
    # Bounded: a slow reader stalls its own conversations (they stop pulling tokens), never
    # another connection.
    send, outbox = anyio.create_memory_object_stream[dict[str, Any]](
        max_buffer_size=settings.ws_send_queue)
    openai = services()
    session = SocketSession(openai.chat, openai.embeddings, send,
                            SocketLimits(max_message_bytes=settings.ws_max_message_bytes,
                                         max_conversations=settings.ws_max_conversations),
                            tenants=tenants, tenant=tenant, key=key)
    refused = False
    with anyio.CancelScope() as connection:  # shutdown cancels it, after final events
        state.sockets.add(connection)
        try:
            async with anyio.create_task_group() as tg, send:
                tg.start_soon(_sender, outbox)
                try:
                    while True:
                        raw = await websocket.receive()
                        await session.dispatch(raw, tg)
                except AuthenticationFailed:
                    refused = True  # a wrong key on an open socket ends every conversation
                    tg.cancel_scope.cancel()
        finally:
            state.sockets.discard(connection)
    if refused:
        await _refuse()
        return
    await websocket.close(1001, "the server is shutting down")


async def _authenticate(tenants: Tenants) -> tuple[Tenant | None, str | None]:
    """Browsers cannot set headers on a WebSocket: their first message carries the key.
    Returns its tenant and the key, or None (refused)."""
    with anyio.move_on_after(AUTH_TIMEOUT_S):
        raw = await websocket.receive()
        key = auth_message_key(raw)
        tenant = await tenants.resolve(key)
        if tenant is not None:
            await websocket.send(orjson.dumps({"type": "auth.ok"}).decode())
            return tenant, key
    await _refuse()
    return None, None


async def _refuse() -> None:
    error = unauthorized(provided=True).body()["error"]
    await websocket.send(orjson.dumps({"type": "error", "id": None, "error": error}).decode())
    await websocket.close(1008, "authentication failed")


async def _sender(outbox: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
    async with outbox:
        async for message in outbox:
            await websocket.send(orjson.dumps(message).decode())
