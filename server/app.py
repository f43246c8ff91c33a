"""The Quart app factory: wires settings, the model registry, services, routes and errors.

Engines run in one anyio task group opened in `while_serving`, alive as long as the app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

import anyio
import orjson
from quart import Quart, Response, g, request, websocket
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from inference.chat.engine import ChatEngine
from inference.embed.batcher import EmbeddingBatcher
from inference.embed.cache import EmbeddingCache
from inference.errors import InferenceError
from server.catalogue import Catalogue
from server.errors import APIError, internal_error, to_api_error
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.responses import json_response
from server.routes import admin, chat, completions, embeddings, health, models, web, ws
from server.security import (
    OPEN_SCOPE,
    APIKeys,
    host_allowed,
    is_json,
    is_loopback,
    origin_allowed,
    request_id,
    same_origin,
    unauthorized,
)
from server.serving_chat import ChatService
from server.serving_completions import CompletionService
from server.serving_embeddings import EmbeddingService
from server.settings import Settings
from server.state import AppState, app_state

log = logging.getLogger(__name__)


def create_app(settings: Settings, engines: list[ChatEngine] | None = None,
               batchers: list[EmbeddingBatcher] | None = None) -> Quart:
    """Build the app. With `engines`/`batchers`, serve those (already loaded) instead of
    `settings`' model folders, which are otherwise loaded in the background after start-up."""
    app = Quart("npugate", static_folder=None)  # the web blueprint serves clients/web
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.body_timeout_s  # slow senders get 408
    if engines is not None or batchers is not None:
        registry = ModelRegistry.from_engines(engines or [], batchers or [])
    else:
        catalogue = Catalogue([*((p, "chat") for p in settings.chat_models),
                               *((p, "embedding") for p in settings.embedding_models)],
                              settings.models_dir)
        registry = ModelRegistry(catalogue, limits=settings.limits(),
                                 keep_alive_s=settings.keep_alive_s,
                                 memory_budget_bytes=settings.memory_budget_mib * 2**20,
                                 load_timeout_s=settings.load_timeout_s)
    embedding_cache = EmbeddingCache(settings.embedding_cache_mib * 2**20)
    registry.on_unload.append(embedding_cache.drop_model)
    metrics = Metrics(registry, embedding_cache)
    for batcher in batchers or []:
        batcher.on_batch = batcher.on_batch or metrics.embedding_batch_observer(batcher.model_id)
    for engine in engines or []:
        engine.on_run = engine.on_run or metrics.chat_run_observer(engine.model_id)
    app.extensions["npugate"] = AppState(
        settings=settings, registry=registry,
        chat=ChatService(registry, metrics, max_messages=settings.max_messages,
                         max_tokens_limit=settings.max_tokens_limit),
        completions=CompletionService(registry, metrics,
                                      max_tokens_limit=settings.max_tokens_limit),
        embeddings=EmbeddingService(registry, max_inputs=settings.embedding_max_inputs,
                                    cache=embedding_cache),
        metrics=metrics)
    for bp in (chat.bp, completions.bp, embeddings.bp, models.bp, health.bp, ws.bp, web.bp,
               admin.bp):
        app.register_blueprint(bp)
    _register_error_handlers(app)
    _register_access_hooks(app, settings)

    @app.while_serving
    async def run_engines() -> AsyncGenerator[None, None]:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run, metrics.embedding_batch_observer,
                           metrics.chat_run_observer)
            yield
            tg.cancel_scope.cancel()

    return app


OPEN_PATHS = ("/", "/favicon.ico", "/openapi.json")
PROBE_PATHS = ("/health", "/health/live", "/health/ready")  # open unless --protect-health
# /metrics carries every key's traffic (cache hits and misses included): with keys configured
# it always takes one
HEALTH_PATHS = (*PROBE_PATHS, "/metrics")


def _register_access_hooks(app: Quart, settings: Settings) -> None:
    keys = APIKeys(settings.api_keys)
    allow = settings.cors_origins
    check_host = is_loopback(settings.host)  # see server/security.py: DNS rebinding
    access_log = logging.getLogger("npugate.access")

    def is_open(path: str) -> bool:
        """No API key needed (admin paths check their own keys: server/routes/admin.py)."""
        return (path in OPEN_PATHS or path.startswith(("/static/", "/v1/admin/"))
                or (not settings.protect_health and path in PROBE_PATHS))

    def check_head_size(url: str, headers: Headers) -> None:
        size = len(url) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > settings.max_header_bytes:
            raise APIError(431, f"the request's URL and headers take {size} bytes; this "
                           f"server accepts at most {settings.max_header_bytes}",
                           code="request_header_fields_too_large")

    def check_host_and_origin(host: str, origin: str | None) -> None:
        if check_host and not host_allowed(host, settings.allowed_hosts):
            raise APIError(403, f"host {host!r} is not one this server answers to; allow it "
                           "with --allowed-host", code="host_not_allowed")
        if not origin_allowed(origin, host, allow):
            raise APIError(403, f"origin {origin} is not allowed; allow it with --cors-origin",
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
            return Response("", status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
                "Access-Control-Max-Age": "600"})
        if app_state().draining and request.path not in HEALTH_PATHS:
            raise APIError(503, "the server is shutting down; retry on another replica",
                           type="service_unavailable", code="shutting_down", retry_after_s=5)
        g.cache_scope = OPEN_SCOPE
        if keys.enabled and not is_open(request.path):
            header = request.headers.get("Authorization")
            scope = keys.header_scope(header)
            if scope is None:
                raise unauthorized(provided=header is not None)
            g.cache_scope = scope
        if request.method == "POST" and not is_json(request.headers.get("Content-Type")) \
                and request.routing_exception is None \
                and not request.path.startswith("/v1/admin/"):  # those read no body
            # (an unknown path gets its 404, whatever it sends)
            # Form and text/plain bodies are what a foreign page can send without a preflight.
            raise APIError(415, "the request body must be JSON, sent with 'Content-Type: "
                           "application/json'", code="unsupported_media_type")
        return None

    @app.after_request
    async def tag_and_log(response: Response) -> Response:
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
            raise APIError(503, "the server is shutting down", type="service_unavailable",
                           code="shutting_down", retry_after_s=5)
        g.ws_scope = keys.header_scope(websocket.headers.get("Authorization"))
        g.api_keys = keys


def _register_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def api_error(err: APIError) -> Response:
        return json_response(err.body(), err.status, err.headers())

    @app.errorhandler(InferenceError)
    async def inference_error(err: InferenceError) -> Response:
        return await api_error(to_api_error(err))

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        status = err.code or 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "payload_too_large"}.get(status)
        return await api_error(APIError(status, err.description or err.name, type=kind,
                                        code=code))

    @app.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unhandled error", exc_info=err)
        return await api_error(internal_error())
