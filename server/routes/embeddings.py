"""`POST /v1/embeddings`."""

from __future__ import annotations

from quart import Blueprint, Response, g

from server.responses import json_body, json_response
from server.state import app_state

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
async def embeddings() -> Response:
    service = app_state().embeddings
    req = service.parse(await json_body())
    return json_response(await service.embed(req, g.cache_scope))
