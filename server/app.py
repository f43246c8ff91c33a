"""The Quart app factory: wires settings, the model registry, services, routes and errors.

Engines run in one anyio task group opened in `while_serving`, alive as long as the app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import anyio
from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from inference.chat.engine import ChatEngine
from inference.embed.batcher import EmbeddingBatcher
from inference.errors import InferenceError
from server.errors import APIError, internal_error, to_api_error
from server.registry import ModelRegistry
from server.responses import json_response
from server.routes import chat, embeddings, health, models, web, ws
from server.serving_chat import ChatService
from server.serving_embeddings import EmbeddingService
from server.settings import Settings
from server.state import AppState

log = logging.getLogger(__name__)


def create_app(settings: Settings, engines: list[ChatEngine] | None = None,
               batchers: list[EmbeddingBatcher] | None = None) -> Quart:
    """Build the app. With `engines`/`batchers`, serve those (already loaded) instead of
    `settings`' model folders, which are otherwise loaded in the background after start-up."""
    app = Quart("npugate", static_folder=None)  # the web blueprint serves clients/web
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if engines is not None or batchers is not None:
        registry = ModelRegistry.from_engines(engines or [], batchers or [])
    else:
        registry = ModelRegistry.from_folders(list(settings.chat_models),
                                              list(settings.embedding_models))
    app.extensions["npugate"] = AppState(
        settings=settings, registry=registry, chat=ChatService(registry),
        embeddings=EmbeddingService(registry, max_inputs=settings.embedding_max_inputs))
    for bp in (chat.bp, embeddings.bp, models.bp, health.bp, ws.bp, web.bp):
        app.register_blueprint(bp)
    _register_error_handlers(app)

    @app.while_serving
    async def run_engines() -> AsyncGenerator[None, None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(registry.serve_all, tg, settings.limits())
            yield
            tg.cancel_scope.cancel()

    return app


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
        code = {404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(status)
        return await api_error(APIError(status, err.description or err.name, type=kind,
                                        code=code))

    @app.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unhandled error", exc_info=err)
        return await api_error(internal_error())
