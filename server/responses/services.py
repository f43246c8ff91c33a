"""The Responses surface's service and its store (in the app's database, which opens while
the app serves), built once per app."""

from __future__ import annotations

from quart import Quart, current_app

from server.core.state import AppState
from server.openai.services import OpenAIServices
from server.responses.service import ResponsesService
from server.responses.store import ResponseStore, Retention

KEY = "npugate.responses"


def install(app: Quart, state: AppState, openai: OpenAIServices) -> ResponsesService:
    settings = state.settings
    store = ResponseStore(state.database, Retention(
        max_age_s=settings.response_max_age_s,
        max_bytes=settings.response_store_mib * 2**20))
    service = app.extensions[KEY] = ResponsesService(openai.chat, store)
    return service


def responses_service(app: Quart | None = None) -> ResponsesService:
    found: ResponsesService = (app or current_app).extensions[KEY]
    return found
