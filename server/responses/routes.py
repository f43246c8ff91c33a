"""The Responses API's routes: `POST /v1/responses` (streamed over SSE with typed events, or
returned whole), `GET` and `DELETE /v1/responses/<id>`, `GET /v1/responses/<id>/input_items`,
and `POST /v1/responses/input_tokens`. Every stored response is its creating key's alone."""

from __future__ import annotations

from quart import Blueprint, Response, g, request

from server.core.errors import bad_request
from server.core.http import event_stream, json_body, json_response
from server.core.state import app_state
from server.responses.service import page
from server.responses.services import responses_service

bp = Blueprint("responses", __name__)


@bp.post("/v1/responses")
async def create() -> Response:
    service = responses_service()
    req = service.parse(await json_body())
    writer, events = await service.create(req, g.tenant,
                                          idle_s=app_state().settings.sse_ping_interval_s)
    if req.stream:
        return await event_stream(events, typed=True)
    return json_response(await service.complete(writer, events))


@bp.post("/v1/responses/input_tokens")
async def input_tokens() -> Response:
    service = responses_service()
    req = service.parse(await json_body())
    return json_response(await service.input_tokens(req, g.tenant))


@bp.get("/v1/responses/<id>")
async def retrieve(id: str) -> Response:
    if request.args.get("stream", "false").lower() == "true":
        raise bad_request("replaying a stored response as a stream is not supported; "
                          "retrieve it whole", param="stream")
    found = await responses_service().get(id, g.tenant.scope)
    return json_response(found.response)


@bp.delete("/v1/responses/<id>")
async def delete(id: str) -> Response:
    return json_response(await responses_service().delete(id, g.tenant.scope))


@bp.get("/v1/responses/<id>/input_items")
async def list_input_items(id: str) -> Response:
    found = await responses_service().get(id, g.tenant.scope)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", param="order")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise bad_request("limit must be an integer from 1 to 100", param="limit")
    return json_response(page(found.context, limit=limit, order=order,
                              after=request.args.get("after")))
