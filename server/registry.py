"""The models this server was asked to serve: their loading state and their engines.

Loading happens in the background after start-up, so `/health` can report `loading` and
requests get 503 until a model is ready. A model that fails to load is reported as failed
while the others serve.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from inference.chat.engine import ChatEngine
from inference.chat.model import ChatModel
from inference.errors import InferenceError
from server.errors import APIError, model_not_found

log = logging.getLogger(__name__)
Status = Literal["loading", "ready", "failed"]


@dataclass
class ModelEntry:
    """One configured model."""

    id: str
    task: Literal["chat"]
    path: Path | None
    status: Status = "loading"
    error: str | None = None
    engine: ChatEngine | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def provider(self) -> str | None:
        return self.engine.model.provider if self.engine else None


def model_id_for(folder: Path) -> str:
    """The id a folder is served under: its manifest's id, else the folder's name."""
    try:
        manifest = json.loads((folder / "npugate-manifest.json").read_text(encoding="utf-8"))
        return str(manifest["id"])
    except (OSError, ValueError, KeyError):
        return folder.name


class ModelRegistry:
    """Holds every configured model by id."""

    def __init__(self) -> None:
        self.entries: dict[str, ModelEntry] = {}

    @classmethod
    def from_folders(cls, chat_folders: list[Path]) -> ModelRegistry:
        registry = cls()
        for folder in chat_folders:
            mid = model_id_for(folder)
            if mid in registry.entries:
                mid = f"{mid}-{len(registry.entries)}"
            registry.entries[mid] = ModelEntry(id=mid, task="chat", path=folder)
        return registry

    @classmethod
    def from_engines(cls, engines: list[ChatEngine]) -> ModelRegistry:
        """For tests and embedding: engines built by the caller, ready at once."""
        registry = cls()
        for engine in engines:
            registry.entries[engine.model_id] = ModelEntry(
                id=engine.model_id, task="chat", path=None, status="ready", engine=engine)
        return registry

    def overall_status(self) -> str:
        statuses = {e.status for e in self.entries.values()}
        if "loading" in statuses:
            return "loading"
        if statuses == {"ready"}:
            return "ready"
        return "degraded" if "ready" in statuses else "failed"

    def chat_engine(self, model: str) -> ChatEngine:
        """The engine for `model`; 404 if unknown, 503 if not (yet) serving."""
        entry = self.entries.get(model)
        if entry is None or entry.task != "chat":
            raise model_not_found(model)
        if entry.status == "loading":
            raise APIError(503, f"model {model} is still loading", type="service_unavailable",
                           code="model_loading", retry_after_s=5)
        if entry.engine is None:
            raise APIError(503, f"model {model} failed to load: {entry.error}",
                           type="service_unavailable", code="model_failed")
        return entry.engine

    async def serve_all(self, tg: TaskGroup, *, max_running: int, max_waiting: int) -> None:
        """Load every model not yet loaded (one at a time, off the event loop) and run its
        engine in `tg`. Engines given ready-made are only started."""
        for entry in self.entries.values():
            if entry.engine is not None:
                await tg.start(entry.engine.run, name=f"engine:{entry.id}")
                continue
            assert entry.path is not None
            try:
                model = await anyio.to_thread.run_sync(
                    lambda e=entry: ChatModel.load(e.path, model_id=e.id))  # type: ignore[misc]
            except InferenceError as exc:
                log.error("model %s failed to load: %s", entry.id, exc.message)
                entry.status, entry.error = "failed", exc.message
                continue
            entry.engine = ChatEngine(model, max_running=max_running, max_waiting=max_waiting)
            await tg.start(entry.engine.run, name=f"engine:{entry.id}")
            entry.status = "ready"
            log.info("model %s ready on %s", entry.id, model.provider)
