"""Admin endpoints, behind their own keys (`--admin-key-file`, NPUGATE_ADMIN_KEYS):
  POST /v1/admin/models/<id>/load     load a model now (waits up to --load-timeout)
  POST /v1/admin/models/<id>/unload   unload it once its in-flight requests finish
    (both answer the model object of /v1/models)
  POST   /v1/admin/keys               create an API key (the key is in this answer only)
  GET    /v1/admin/keys               every key, revoked ones included (never the keys)
  GET    /v1/admin/keys/<id or name>  one key
  DELETE /v1/admin/keys/<id or name>  revoke it: its next request fails
  GET    /v1/admin/usage              usage by day and tenant (?from=, ?to=, ?tenant=)
Without admin keys configured they answer 403. `npugate keys` is their command line.
"""

from __future__ import annotations

import re
import time
from http import HTTPStatus
from typing import Any

import orjson
from quart import Blueprint, Response, request

from server.core.errors import bad_request, conflict, forbidden, not_found, unauthorized
from server.core.http import json_response
from server.core.security import APIKeys
from server.core.state import app_state
from server.core.tenant import Limits
from server.openai.routes import model_object
from server.tenants.keys import KeyRequestError
from server.tenants.usage import COUNTS, utc_day

DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
KEY_FIELDS = {"name", "models", "weight", "scope", *Limits.__dataclass_fields__}

bp = Blueprint("admin", __name__)


def check_admin() -> None:
    keys = APIKeys(app_state().settings.admin_keys)
    if not keys.enabled:
        raise forbidden("admin endpoints are off; start the server with --admin-key-file or "
                        "NPUGATE_ADMIN_KEYS", type="permission_error", code="admin_disabled")
    header = request.headers.get("Authorization")
    if not keys.check_header(header):
        raise unauthorized(provided=header is not None)


@bp.post("/v1/admin/models/<path:model_id>/load")
async def load(model_id: str) -> Response:
    check_admin()
    registry = app_state().registry
    entry = await registry.entry(model_id)
    await registry.load(entry)
    return json_response(model_object(entry))


@bp.post("/v1/admin/models/<path:model_id>/unload")
async def unload(model_id: str) -> Response:
    check_admin()
    registry = app_state().registry
    entry = await registry.entry(model_id)
    await registry.unload(entry)
    return json_response(model_object(entry))


async def _body() -> dict[str, Any]:
    raw = await request.get_data()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, kind: type = int) -> Any:
    value = body.get(name)
    if value is None:
        return kind(0) if kind is int else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or \
            (kind is int and not float(value).is_integer()):
        what = "integer" if kind is int else "number"
        raise bad_request(f"{name} must be a non-negative {what}", param=name)
    return kind(value)


@bp.post("/v1/admin/keys")
async def create_key() -> Response:
    check_admin()
    body = await _body()
    unknown = sorted(set(body) - KEY_FIELDS)
    if unknown:
        raise bad_request(f"unknown fields {unknown}; a key takes {sorted(KEY_FIELDS)}",
                          param=unknown[0])
    name, models, scope = body.get("name"), body.get("models"), body.get("scope")
    if not isinstance(name, str):
        raise bad_request("name is required: what usage and /metrics call the key",
                          param="name")
    if models is not None and (not isinstance(models, list) or not models
                               or not all(isinstance(m, str) and m for m in models)):
        raise bad_request("models must be a non-empty list of model ids", param="models")
    if scope is not None and not isinstance(scope, str):
        raise bad_request("scope must be a string", param="scope")
    limits = Limits(**{f: _number(body, f) for f in Limits.__dataclass_fields__})
    weight = _number(body, "weight", float)
    try:
        record, key = await app_state().tenants.keys.create(
            name, models=None if models is None else tuple(models), limits=limits,
            weight=1.0 if weight is None else weight, scope=scope)
    except KeyRequestError as exc:
        if exc.conflict:
            raise conflict(str(exc), code="key_exists", param=exc.param) from exc
        raise bad_request(str(exc), param=exc.param) from exc
    return json_response({**record.describe(), "key": key}, HTTPStatus.CREATED)


@bp.get("/v1/admin/keys")
async def list_keys() -> Response:
    check_admin()
    return json_response({"object": "list", "data": [
        record.describe() for record in await app_state().tenants.keys.list()]})


@bp.route("/v1/admin/keys/<key_id>", methods=["GET", "DELETE"])
async def one_key(key_id: str) -> Response:
    """GET: the key; DELETE: revoke it (its next request fails)."""
    check_admin()
    keys = app_state().tenants.keys
    record = await (keys.revoke(key_id) if request.method == "DELETE" else keys.get(key_id))
    if record is None:
        raise not_found(f"no key {key_id!r}", code="key_not_found")
    return json_response(record.describe())


@bp.get("/v1/admin/usage")
async def usage() -> Response:
    """Totals by UTC day and tenant, from the database (this replica's last second
    included); the last 30 days unless `from` and `to` say otherwise."""
    check_admin()
    last = request.args.get("to") or utc_day()
    first = request.args.get("from") or utc_day(time.time() - 29 * 86400)
    for name, day in (("from", first), ("to", last)):
        if not DAY.match(day):
            raise bad_request(f"{name} must be a UTC day, YYYY-MM-DD", param=name)
    book = app_state().tenants.usage
    await book.flush()
    rows = await book.by_day(first, last, request.args.get("tenant"))
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        into = totals.setdefault(row["tenant"], dict.fromkeys(COUNTS, 0))
        for c in COUNTS:
            into[c] += row[c]
    return json_response({"object": "usage", "from": first, "to": last, "data": rows,
                          "totals": totals})
