"""What every API surface shares, held on the app: settings, the model registry, metrics,
the embedding cache, the database and the tenants in it, and the server's lifecycle. Each
surface keeps its own services beside it (`server.openai.services`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from quart import current_app

from inference.embed.cache import EmbeddingCache
from server.core.database import Database
from server.core.metrics import Metrics
from server.core.registry import ModelRegistry
from server.settings import Settings
from server.tenants.service import Tenants


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    embedding_cache: EmbeddingCache
    database: Database  # stored responses, keys and usage (open while the app serves)
    tenants: Tenants
    started: float = field(default_factory=time.monotonic)
    draining: bool = False  # shutting down: no new work
    sockets: set[anyio.CancelScope] = field(default_factory=set)  # open /v1/ws connections

    def status(self) -> str:
        return "draining" if self.draining else self.registry.overall_status()


def app_state() -> AppState:
    """The current app's state (inside a request)."""
    state: AppState = current_app.extensions["npugate"]
    return state
