"""The HTTP edge every API surface shares: the checks each request passes before its route
(see `server.core.security` for the rules) and the error handlers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from quart import Blueprint, Quart, Response, g, request, websocket
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from inference.errors import InferenceError
from server.core.database import DatabaseUnavailable
from server.core.errors import (
    APIError,
    forbidden,
    from_http_exception,
    headers_too_large,
    internal_error,
    to_api_error,
    unauthorized,
    unavailable,
    unsupported_media_type,
)
from server.core.http import json_response
from server.core.security import (
    bearer_token,
    host_allowed,
    is_json,
    is_loopback,
    origin_allowed,
    request_id,
    same_origin,
)
from server.core.state import app_state
from server.core.tenant import OPEN
from server.settings import Settings
from server.tenants.usage import Counts

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/favicon.ico", "/openapi.json", "/dashboard")  # its figures take a key
PROBE_PATHS = ("/health", "/health/live", "/health/ready")  # open unless --protect-health
# /metrics carries every key's traffic (cache hits and misses included): with keys configured
# it always takes one
HEALTH_PATHS = (*PROBE_PATHS, "/metrics")


def install_access_hooks(app: Quart, settings: Settings) -> None:
    """Every request's checks, before any route: size, host and origin, CORS preflight,
    draining, API key (which sets `g.tenant`, and takes one of its requests per minute),
    content type; then counting, tagging and logging."""
    state = app.extensions["npugate"]  # the AppState (create_app builds it first)
    metrics, tenants = state.metrics, state.tenants
    allow = settings.cors_origins
    check_host = is_loopback(settings.host)  # see server/core/security.py: DNS rebinding
    access_log = logging.getLogger("npugate.access")

    def is_open(path: str) -> bool:
        """No API key needed (admin paths check their own keys: server/ops/admin.py)."""
        return (path in OPEN_PATHS or path.startswith(("/static/", "/v1/admin/"))
                or (not settings.protect_health and path in PROBE_PATHS))

    def check_head_size(url: str, headers: Headers) -> None:
        size = len(url) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > settings.max_header_bytes:
            raise headers_too_large(f"the request's URL and headers take {size} bytes; this "
                                    f"server accepts at most {settings.max_header_bytes}")

    def check_host_and_origin(host: str, origin: str | None) -> None:
        if check_host and not host_allowed(host, settings.allowed_hosts):
            raise forbidden(f"host {host!r} is not one this server answers to; allow it with "
                            "--allowed-host", code="host_not_allowed")
        if not origin_allowed(origin, host, allow):
            raise forbidden(f"origin {origin} is not allowed; allow it with --cors-origin",
                            code="origin_not_allowed")

    @app.before_request
    async def identify_and_authenticate() -> Response | None:
        g.request_id = request_id(request.headers.get("X-Request-Id"))
        g.started = time.perf_counter()
        check_head_size(request.url, request.headers)
        origin = request.headers.get("Origin")
        if request.path not in OPEN_PATHS and not request.path.startswith("/static/"):
            # Every API request, not only preflights: browsers send simple POSTs without one.
            check_host_and_origin(request.host, origin)
        if request.method == "OPTIONS" and origin:  # CORS preflight
            return Response("", status=HTTPStatus.NO_CONTENT, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id, "
                                                "x-api-key, anthropic-version, anthropic-beta",
                "Access-Control-Max-Age": "600"})
        if app_state().draining and request.path not in HEALTH_PATHS:
            raise unavailable("the server is shutting down; retry on another replica",
                              code="shutting_down")
        g.tenant = OPEN
        if not is_open(request.path):
            header = request.headers.get("Authorization")
            anthropic = request.headers.get("x-api-key")  # Anthropic's clients send this
            tenant = await tenants.resolve(bearer_token(header) if header is not None
                                           else anthropic)
            if tenant is None:
                g.unauthenticated = True  # counted apart from every tenant
                raise unauthorized(provided=header is not None or anthropic is not None)
            g.tenant = tenant
            if request.path.startswith("/v1/"):
                tenants.gate.check_request(tenant)
        if request.method == "POST" and not is_json(request.headers.get("Content-Type")) \
                and request.routing_exception is None \
                and not request.path.startswith("/v1/admin/"):  # those read no body
            # (an unknown path gets its 404, whatever it sends)
            # Form and text/plain bodies are what a foreign page can send without a preflight.
            raise unsupported_media_type("the request body must be JSON, sent with "
                                         "'Content-Type: application/json'")
        return None

    @app.after_request
    async def tag_and_log(response: Response) -> Response:
        if request.path.startswith("/v1/") and not request.path.startswith("/v1/admin/"):
            tenant = None if getattr(g, "unauthenticated", False) else getattr(g, "tenant", OPEN)
            metrics.count_request(tenant and tenant.name, response.status_code)
            if tenant is not None:
                tenants.usage.add(tenant.name, Counts.of_request(response.status_code))
        rid = getattr(g, "request_id", None) or request_id(None)
        response.headers["X-Request-Id"] = rid
        origin = request.headers.get("Origin")
        if origin and not same_origin(origin, request.host) and \
                origin_allowed(origin, request.host, allow):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
            response.headers["Vary"] = "Origin"
        if access_log.isEnabledFor(logging.INFO):
            started = getattr(g, "started", time.perf_counter())
            access_log.info(orjson.dumps({
                "request_id": rid, "method": request.method, "path": request.path,
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1e3, 2)}).decode())
        return response

    @app.before_websocket
    async def check_origin() -> None:
        # Browsers send cookies and credentials cross-origin to sockets; refuse foreign pages.
        g.request_id = request_id(websocket.headers.get("X-Request-Id"))
        check_head_size(websocket.url, websocket.headers)
        check_host_and_origin(websocket.host, websocket.headers.get("Origin"))
        if app_state().draining:
            raise unavailable("the server is shutting down", code="shutting_down")
        # no tenant yet: the first message must carry the key (browsers cannot set headers)
        g.ws_key = bearer_token(websocket.headers.get("Authorization"))
        g.ws_tenant = await tenants.resolve(g.ws_key)


def openai_error(err: APIError) -> tuple[int, dict[str, Any]]:
    return err.status, err.body()


def install_error_handlers(target: Quart | Blueprint,
                           shape: Callable[[APIError], tuple[int, dict[str, Any]]] = openai_error
                           ) -> None:
    """Every error becomes a body with its status (`server.core.errors`): OpenAI's by default;
    a surface with its own shape installs it on its blueprint (the Messages API)."""
    @target.errorhandler(APIError)
    async def api_error(err: APIError) -> Response:
        status, body = shape(err)
        return json_response(body, status, err.headers())

    @target.errorhandler(InferenceError)
    async def inference_error(err: InferenceError) -> Response:
        return await api_error(to_api_error(err))

    @target.errorhandler(DatabaseUnavailable)
    async def database_error(err: DatabaseUnavailable) -> Response:
        log.warning("database unavailable: %s", err)
        return await api_error(unavailable("the server's database cannot be reached; retry "
                                           "later", code="database_unavailable"))

    @target.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        return await api_error(from_http_exception(err))

    @target.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unhandled error", exc_info=err)
        return await api_error(internal_error())
