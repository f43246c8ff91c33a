"""`POST /v1/embeddings`."""

from __future__ import annotations

from quart import Blueprint, Response, request

from server.protocol import parse_json_body
from server.responses import json_response
from server.state import app_state

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
async def embeddings() -> Response:
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    service = app_state().embeddings
    req = service.parse(parse_json_body(raw))
    return json_response(await service.embed(req))
