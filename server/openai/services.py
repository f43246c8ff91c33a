"""The OpenAI surface's services, built once per app from the shared state."""

from __future__ import annotations

from dataclasses import dataclass

from quart import Quart, current_app

from server.core.state import AppState
from server.openai.chat import ChatService
from server.openai.completions import CompletionService
from server.openai.embeddings import EmbeddingService

KEY = "npugate.openai"


@dataclass(frozen=True)
class OpenAIServices:
    chat: ChatService
    completions: CompletionService
    embeddings: EmbeddingService


def install(app: Quart, state: AppState) -> OpenAIServices:
    """Build the services on `app` (its routes and other surfaces find them there)."""
    settings = state.settings
    gate = state.tenants.gate
    found = app.extensions[KEY] = OpenAIServices(
        chat=ChatService(state.registry, state.metrics, gate,
                         max_messages=settings.max_messages,
                         max_tokens_limit=settings.max_tokens_limit),
        completions=CompletionService(state.registry, state.metrics, gate,
                                      max_tokens_limit=settings.max_tokens_limit),
        embeddings=EmbeddingService(state.registry, max_inputs=settings.embedding_max_inputs,
                                    cache=state.embedding_cache, gate=gate,
                                    metrics=state.metrics))
    return found


def services(app: Quart | None = None) -> OpenAIServices:
    """The current app's OpenAI services (inside a request, or of `app`)."""
    found: OpenAIServices = (app or current_app).extensions[KEY]
    return found
