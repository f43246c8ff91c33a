"""The models this server was asked to serve: their loading state and their engines.

Loading happens in the background after start-up, so `/health` can report `loading` and
requests get 503 until a model is ready. A model that fails to load is reported as failed
while the others serve.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from inference.chat.engine import DEFAULT_KV_BUDGET, DEFAULT_PREFILL_CHUNK, ChatEngine, RunObserver
from inference.chat.model import ChatModel
from inference.embed.batcher import EmbeddingBatcher
from inference.embed.model import EmbeddingModel
from inference.errors import InferenceError
from inference.providers import QnnOptions
from server.errors import APIError, model_not_found

log = logging.getLogger(__name__)
Status = Literal["loading", "ready", "failed"]
BatchObserverFactory = Callable[[str], Callable[[int, int, float], None]]
RunObserverFactory = Callable[[str], RunObserver]
Task = Literal["chat", "embedding"]


@dataclass(frozen=True)
class EngineLimits:
    """Per-model scheduling limits, from Settings."""

    max_running: int = 8
    max_waiting: int = 16
    max_tokens_limit: int = 4096
    kv_budget_bytes: int = DEFAULT_KV_BUDGET
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prompt_cache: bool = True
    embedding_device: str = "auto"
    embedding_max_batch: int = 32
    embedding_batch_tokens: int = 16384
    embedding_max_queued: int = 2048
    qnn: QnnOptions = field(default_factory=QnnOptions)
    qnn_cache_dir: Path | None = None


@dataclass
class ModelEntry:
    """One configured model."""

    id: str
    task: Task
    path: Path | None
    status: Status = "loading"
    error: str | None = None
    chat: ChatEngine | None = None
    embedding: EmbeddingBatcher | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def provider(self) -> str | None:
        if self.chat is not None:
            return self.chat.provider
        if self.embedding is not None:
            return self.embedding.provider
        return None

    def describe(self) -> dict[str, Any]:
        """Status, provider and counters, for /health."""
        info: dict[str, Any] = {"id": self.id, "task": self.task, "status": self.status,
                                "provider": self.provider, "error": self.error}
        if self.chat is not None:
            info["requests_running"] = self.chat.running
            info["requests_waiting"] = self.chat.waiting
            info["stats"] = {**dataclasses.asdict(self.chat.stats),
                             "model_runs_total": self.chat.stats.model_runs_total}
            info["kv_cache"] = self.chat.kv_usage()
            info["prompt_cache"] = self.chat.cache_stats()
        if self.embedding is not None:
            info["inputs_queued"] = self.embedding.queued
            info["stats"] = dataclasses.asdict(self.embedding.stats)
            info.update(self.embedding.device_info())
        return info


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

    def _add(self, entry: ModelEntry) -> None:
        if entry.id in self.entries:
            entry.id = f"{entry.id}-{len(self.entries)}"
        self.entries[entry.id] = entry

    @classmethod
    def from_folders(cls, chat: list[Path], embedding: list[Path]) -> ModelRegistry:
        registry = cls()
        for task, folders in (("chat", chat), ("embedding", embedding)):
            for folder in folders:
                registry._add(ModelEntry(id=model_id_for(folder), task=task,  # type: ignore[arg-type]
                                         path=folder))
        return registry

    @classmethod
    def from_engines(cls, chat: list[ChatEngine], embedding: list[EmbeddingBatcher]
                     ) -> ModelRegistry:
        """For tests and embedding: engines built by the caller, ready once started."""
        registry = cls()
        for engine in chat:
            registry._add(ModelEntry(id=engine.model_id, task="chat", path=None, chat=engine))
        for batcher in embedding:
            registry._add(ModelEntry(id=batcher.model_id, task="embedding", path=None,
                                     embedding=batcher))
        return registry

    def idle(self) -> bool:
        """No generation or embedding is queued or running."""
        return all((e.chat is None or e.chat.idle) and (e.embedding is None or e.embedding.idle)
                   for e in self.entries.values())

    def stop_all(self, error: InferenceError) -> None:
        """End all remaining work, telling each consumer `error` (shutdown)."""
        for entry in self.entries.values():
            if entry.chat is not None:
                entry.chat.stop_all(error)
            if entry.embedding is not None:
                entry.embedding.stop_all(error)

    def overall_status(self) -> str:
        statuses = {e.status for e in self.entries.values()}
        if "loading" in statuses:
            return "loading"
        if statuses <= {"ready"}:
            return "ready"
        return "degraded" if "ready" in statuses else "failed"

    def _entry(self, model: str, task: Task) -> ModelEntry:
        entry = self.entries.get(model)
        if entry is None:
            raise model_not_found(model)
        if entry.task != task:
            served = "/v1/chat/completions" if entry.task == "chat" else "/v1/embeddings"
            raise APIError(400, f"model {model} is a{'n' if entry.task == 'embedding' else ''} "
                           f"{entry.task} model; use it with {served}", param="model",
                           code="wrong_model_task")
        if entry.status == "loading":
            raise APIError(503, f"model {model} is still loading", type="service_unavailable",
                           code="model_loading", retry_after_s=5)
        if entry.status == "failed":
            raise APIError(503, f"model {model} failed to load: {entry.error}",
                           type="service_unavailable", code="model_failed")
        return entry

    def chat_engine(self, model: str) -> ChatEngine:
        """The engine for `model`; 404 if unknown, 503 if not (yet) serving."""
        engine = self._entry(model, "chat").chat
        assert engine is not None
        return engine

    def embedding_batcher(self, model: str) -> EmbeddingBatcher:
        """The batcher for `model`; 404 if unknown, 503 if not (yet) serving."""
        batcher = self._entry(model, "embedding").embedding
        assert batcher is not None
        return batcher

    async def serve_all(self, tg: TaskGroup, limits: EngineLimits,
                        batch_observer: BatchObserverFactory | None = None,
                        run_observer: RunObserverFactory | None = None) -> None:
        """Load every model (one at a time, off the event loop) and run its engine in `tg`."""
        for entry in self.entries.values():
            try:
                if entry.chat is None and entry.embedding is None:
                    on_batch = batch_observer(entry.id) if batch_observer else None
                    on_run = run_observer(entry.id) if run_observer else None
                    await anyio.to_thread.run_sync(self._load, entry, limits, on_batch, on_run)
            except InferenceError as exc:
                log.error("model %s failed to load: %s", entry.id, exc.message)
                entry.status, entry.error = "failed", exc.message
                continue
            runner = entry.chat.run if entry.chat is not None else entry.embedding.run  # type: ignore[union-attr]
            await tg.start(runner, name=f"engine:{entry.id}")
            entry.status = "ready"
            log.info("model %s (%s) ready on %s", entry.id, entry.task, entry.provider)

    @staticmethod
    def _load(entry: ModelEntry, limits: EngineLimits,
              on_batch: Callable[[int, int, float], None] | None,
              on_run: RunObserver | None) -> None:
        assert entry.path is not None
        if entry.task == "chat":
            model = ChatModel.load(entry.path, model_id=entry.id)
            entry.chat = ChatEngine(model, max_running=limits.max_running,
                                    max_waiting=limits.max_waiting,
                                    default_max_tokens=limits.max_tokens_limit,
                                    kv_budget_bytes=limits.kv_budget_bytes,
                                    prefill_chunk=limits.prefill_chunk,
                                    prompt_cache=limits.prompt_cache, on_run=on_run)
            return
        cache = limits.qnn_cache_dir / entry.id if limits.qnn_cache_dir else None
        emb = EmbeddingModel.load(entry.path, model_id=entry.id,
                                  device=limits.embedding_device, cache_dir=cache,
                                  qnn=limits.qnn)
        entry.embedding = EmbeddingBatcher(emb, max_batch_size=limits.embedding_max_batch,
                                           max_batch_tokens=limits.embedding_batch_tokens,
                                           max_queued_inputs=limits.embedding_max_queued,
                                           on_batch=on_batch)
