"""The Quart app factory: the composition root. It builds what every surface shares (the
registry, metrics, the embedding cache: `server.core`), installs each API surface (OpenAI,
the WebSocket, operations) and the shared HTTP edge.

Engines run in one anyio task group opened in `while_serving`, alive as long as the app.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
from quart import Quart

from inference.chat.engine import ChatEngine
from inference.embed.batcher import EmbeddingBatcher
from inference.embed.cache import EmbeddingCache
from server.core.access import install_access_hooks, install_error_handlers
from server.core.catalogue import Catalogue
from server.core.database import open_database
from server.core.metrics import Metrics
from server.core.registry import ModelRegistry
from server.core.security import APIKeys
from server.core.state import AppState
from server.messages import routes as messages_routes
from server.openai import routes as openai_routes
from server.openai import services as openai_services
from server.ops import admin, dashboard, health, web
from server.responses import routes as responses_routes
from server.responses import services as responses_services
from server.responses.store import SCHEMA
from server.settings import Settings
from server.tenants.service import SCHEMA as TENANT_SCHEMA
from server.tenants.service import Tenants
from server.tenants.usage import FLUSH_EVERY_S as USAGE_FLUSH_S
from server.ws import routes as ws_routes


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
        registry = ModelRegistry(catalogue, settings)
    embedding_cache = EmbeddingCache(settings.embedding_cache_mib * 2**20)
    registry.on_unload.append(embedding_cache.drop_model)
    metrics = Metrics(registry, embedding_cache)
    for batcher in batchers or []:
        batcher.on_batch = batcher.on_batch or metrics.embedding_batch_observer(batcher.model_id)
    for engine in engines or []:
        engine.on_run = engine.on_run or metrics.chat_run_observer(engine.model_id)
    database = open_database(settings.response_store, settings.data_dir)
    tenants = Tenants(database, APIKeys(settings.api_keys))
    state = app.extensions["npugate"] = AppState(settings=settings, registry=registry,
                                                 metrics=metrics,
                                                 embedding_cache=embedding_cache,
                                                 database=database, tenants=tenants)

    @app.while_serving  # first: the surfaces' own start-up may read it
    async def open_database_and_books() -> AsyncGenerator[None, None]:
        await database.open([*SCHEMA, *TENANT_SCHEMA])
        await tenants.keys.any_keys(max_age_s=0)  # known from the start
        try:
            async with tenants.keep_books(USAGE_FLUSH_S):
                yield
        finally:
            await database.close()

    # The API surfaces: each one's services, then its routes
    openai = openai_services.install(app, state)
    responses_services.install(app, state, openai)
    dashboard.install(app, state)
    for bp in (openai_routes.bp, responses_routes.bp, messages_routes.bp, ws_routes.bp,
               health.bp, admin.bp, dashboard.bp, web.bp):
        app.register_blueprint(bp)
    install_error_handlers(app)
    install_access_hooks(app, settings)

    @app.while_serving
    async def run_engines() -> AsyncGenerator[None, None]:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run, metrics.embedding_batch_observer,
                           metrics.chat_run_observer)
            yield
            tg.cancel_scope.cancel()

    return app
