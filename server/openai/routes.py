"""The OpenAI routes: `POST /v1/chat/completions` and `/v1/completions` (streamed over SSE
or returned whole), `POST /v1/embeddings`, `GET /v1/models` and `/v1/models/<id>` (every model
this server can serve, each marked loaded or not), and `/openapi.json`. Each parses, calls a
service and maps its result to a response."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, g

from server.core.http import event_stream, json_body, json_response
from server.core.registry import ModelEntry
from server.core.state import app_state
from server.openai.chunks import without_usage
from server.openai.openapi import openapi_document
from server.openai.services import services

bp = Blueprint("openai", __name__)
OPENAPI = openapi_document()


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    chat = services().chat
    req = chat.parse(await json_body())
    stream = await chat.start(req, "sse" if req.stream else "chat", g.tenant)
    if not req.stream:
        return json_response(await chat.complete(req, stream))
    events = chat.events(req, stream, include_usage=req.include_usage(),
                         idle_s=app_state().settings.sse_ping_interval_s)
    return await event_stream(events if req.include_usage() else without_usage(events))


@bp.post("/v1/completions")
async def completions() -> Response:
    service = services().completions
    req = service.parse(await json_body())
    stream, echo = await service.start(req, g.tenant)
    if not req.stream:
        return json_response(await service.complete(req, stream, echo))
    events = service.events(req, stream, echo, include_usage=req.include_usage(),
                            idle_s=app_state().settings.sse_ping_interval_s)
    return await event_stream(events if req.include_usage() else without_usage(events))


@bp.post("/v1/embeddings")
async def embeddings() -> Response:
    service = services().embeddings
    req = service.parse(await json_body())
    return json_response(await service.embed(req, g.tenant))


def model_object(entry: ModelEntry) -> dict[str, Any]:
    obj: dict[str, Any]
    obj = {"id": entry.id, "object": "model", "created": entry.created, "owned_by": "npugate",
           "task": entry.task, "provider": entry.provider, "loaded": entry.status == "ready",
           "status": entry.status}
    if entry.embedding is not None:
        obj["qnn_device"] = entry.embedding.device_info()["qnn_device"]
    return obj


@bp.get("/openapi.json")
async def openapi() -> Response:
    """The OpenAPI document of the HTTP API."""
    return json_response(OPENAPI)


@bp.get("/v1/models")
async def list_models() -> Response:
    registry = app_state().registry
    await registry.refresh()  # models prepared while the server runs
    allowed = g.tenant.models  # a key limited to some models sees those
    return json_response({"object": "list",
                          "data": [model_object(e) for e in registry.entries.values()
                                   if allowed is None or e.id in allowed]})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    registry = app_state().registry
    registry.check_access(g.tenant, model_id)
    return json_response(model_object(await registry.entry(model_id)))
