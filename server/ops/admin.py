"""Admin endpoints, behind their own keys (`--admin-key-file`, NPUGATE_ADMIN_KEYS):
  POST /v1/admin/models/<id>/load     load a model now (waits up to --load-timeout)
  POST /v1/admin/models/<id>/unload   unload it once its in-flight requests finish
Both answer the model object of /v1/models. Without admin keys configured they answer 403.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from server.core.errors import forbidden, unauthorized
from server.core.http import json_response
from server.core.security import APIKeys
from server.core.state import app_state
from server.openai.routes import model_object

bp = Blueprint("admin", __name__)


def _check_admin() -> None:
    keys = APIKeys(app_state().settings.admin_keys)
    if not keys.enabled:
        raise forbidden("admin endpoints are off; start the server with --admin-key-file or "
                        "NPUGATE_ADMIN_KEYS", type="permission_error", code="admin_disabled")
    header = request.headers.get("Authorization")
    if not keys.check_header(header):
        raise unauthorized(provided=header is not None)


@bp.post("/v1/admin/models/<path:model_id>/load")
async def load(model_id: str) -> Response:
    _check_admin()
    registry = app_state().registry
    entry = await registry.entry(model_id)
    await registry.load(entry)
    return json_response(model_object(entry))


@bp.post("/v1/admin/models/<path:model_id>/unload")
async def unload(model_id: str) -> Response:
    _check_admin()
    registry = app_state().registry
    entry = await registry.entry(model_id)
    await registry.unload(entry)
    return json_response(model_object(entry))
