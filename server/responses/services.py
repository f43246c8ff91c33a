"""The Responses surface's service and its store, built once per app; the store opens while
the app serves and closes after."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from quart import Quart, current_app

from server.core.state import AppState
from server.openai.services import OpenAIServices
from server.responses.service import ResponsesService
from server.responses.store import Retention, open_store

KEY = "npugate.responses"


def install(app: Quart, state: AppState, openai: OpenAIServices) -> ResponsesService:
    settings = state.settings
    store = open_store(settings.response_store, settings.data_dir, Retention(
        max_age_s=settings.response_max_age_s,
        max_bytes=settings.response_store_mib * 2**20))
    service = app.extensions[KEY] = ResponsesService(openai.chat, store)

    @app.while_serving
    async def store_open() -> AsyncGenerator[None, None]:
        await store.open()
        try:
            yield
        finally:
            await store.close()

    return service


def responses_service(app: Quart | None = None) -> ResponsesService:
    found: ResponsesService = (app or current_app).extensions[KEY]
    return found
