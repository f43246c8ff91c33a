"""`GET /v1/models`, `GET /v1/models/<id>` (the models ready to serve) and `/openapi.json`."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from server.errors import model_not_found
from server.openapi import openapi_document
from server.registry import ModelEntry
from server.responses import json_response
from server.state import app_state

bp = Blueprint("models", __name__)
OPENAPI = openapi_document()


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    obj: dict[str, Any]
    obj = {"id": entry.id, "object": "model", "created": entry.created, "owned_by": "npugate",
           "task": entry.task, "provider": entry.provider}
    if entry.embedding is not None:
        obj["qnn_device"] = entry.embedding.device_info()["qnn_device"]
    return obj


@bp.get("/openapi.json")
async def openapi() -> Response:
    """The OpenAPI document of the HTTP API."""
    return json_response(OPENAPI)


@bp.get("/v1/models")
async def list_models() -> Response:
    entries = app_state().registry.entries.values()
    return json_response({"object": "list",
                          "data": [_model_object(e) for e in entries if e.status == "ready"]})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    entry = app_state().registry.entries.get(model_id)
    if entry is None or entry.status != "ready":
        raise model_not_found(model_id)
    return json_response(_model_object(entry))
