"""`GET /v1/models`, `GET /v1/models/<id>` (every model this server can serve, each marked
loaded or not) and `/openapi.json`."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from server.openapi import openapi_document
from server.registry import ModelEntry
from server.responses import json_response
from server.state import app_state

bp = Blueprint("models", __name__)
OPENAPI = openapi_document()


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
    return json_response({"object": "list",
                          "data": [model_object(e) for e in registry.entries.values()]})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    return json_response(model_object(await app_state().registry.entry(model_id)))
