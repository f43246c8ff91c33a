"""What the routes share: settings, the model registry and the services, held on the app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from quart import current_app

from server.metrics import Metrics
from server.registry import ModelRegistry
from server.serving_chat import ChatService
from server.serving_completions import CompletionService
from server.serving_embeddings import EmbeddingService
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry
    chat: ChatService
    completions: CompletionService
    embeddings: EmbeddingService
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    draining: bool = False  # shutting down: no new work
    sockets: set[anyio.CancelScope] = field(default_factory=set)  # open /v1/ws connections

    def status(self) -> str:
        return "draining" if self.draining else self.registry.overall_status()


def app_state() -> AppState:
    """The current app's state (inside a request)."""
    state: AppState = current_app.extensions["npugate"]
    return state
