"""The models being served: which are loaded, loading on demand, idle, or unloading.

- The models named at start-up load in the background after it, one at a time, so `/health`
  can report `loading` and their requests get 503 until they are ready. One that fails to
  load is reported as failed while the others serve.
- Any other model of the catalogue (`server/core/catalogue.py`: every model prepared in the models
  directory, also one prepared while the server runs) loads when a request names it. The
  request waits for it, or gets 503 with `Retry-After` once `load_timeout_s` has passed (the
  load goes on, and later requests find it ready).
- A model idle for its keep-alive (the server's, or the last request's `keep_alive`) unloads.
  Unloading waits for the model's in-flight requests: those admitted finish first, and
  requests arriving meanwhile load it again after.
- Loaded models stay within a memory budget: loading one unloads the least recently used
  idle models until it fits, or answers 503 if the busy ones leave no room.
Catalogue lookup is in `catalogue.py`, loading in `loader.py`; this module only keeps state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from inference.chat.engine import ChatEngine, RunObserver
from inference.embed.batcher import EmbeddingBatcher
from inference.errors import InferenceError
from server.core.catalogue import Catalogue, CatalogueEntry, Task
from server.core.errors import APIError, bad_request, forbidden, model_not_found, unavailable
from server.core.loader import expected_bytes, load_engine
from server.core.tenant import OPEN, Tenant
from server.settings import Settings

log = logging.getLogger(__name__)
Status = Literal["unloaded", "loading", "ready", "unloading", "failed"]
BatchObserverFactory = Callable[[str], Callable[[int, int, float], None]]
RunObserverFactory = Callable[[str], RunObserver]
Engine = ChatEngine | EmbeddingBatcher
REAP_INTERVAL_S = 0.5


@dataclass
class ModelEntry:
    """One model the server knows of, and its engine while loaded."""

    id: str
    task: Task
    source: CatalogueEntry | None  # None: an engine the caller built (never unloaded)
    status: Status = "unloaded"
    error: str | None = None
    chat: ChatEngine | None = None
    embedding: EmbeddingBatcher | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests between looking the model up and handing it their work
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float | None = None  # the last request's `keep_alive`; None: the server's
    expected_bytes: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)  # set at each status change
    scope: anyio.CancelScope | None = None  # the running engine's

    @property
    def engine(self) -> Engine | None:
        return self.chat if self.chat is not None else self.embedding

    @property
    def provider(self) -> str | None:
        engine = self.engine
        return engine.provider if engine is not None else None

    @property
    def idle(self) -> bool:
        engine = self.engine
        return self.active == 0 and (engine is None or engine.idle)

    def set_status(self, status: Status, error: str | None = None) -> None:
        self.status, self.error = status, error
        self.changed.set()
        self.changed = anyio.Event()

    def memory_bytes(self) -> int:
        """What the loaded model holds: its expected size, plus what a chat model's KV pool
        holds in memory (the pages written, not the buffer's size or its reservations)."""
        if self.status not in ("ready", "loading", "unloading"):
            return 0
        kv = self.chat.kv_usage()["resident_bytes"] if self.chat is not None else 0
        return self.expected_bytes + kv

    def describe(self) -> dict[str, Any]:
        """Status, provider and counters, for /health."""
        info: dict[str, Any] = {"id": self.id, "task": self.task, "status": self.status,
                                "provider": self.provider, "error": self.error,
                                "loaded": self.status == "ready"}
        if self.chat is not None:
            info["requests_running"] = self.chat.running
            info["requests_waiting"] = self.chat.waiting
            info["stats"] = {**dataclasses.asdict(self.chat.stats),
                             "model_runs_total": self.chat.stats.model_runs_total}
            info["kv_cache"] = self.chat.kv_usage()
            info["prompt_cache"] = self.chat.cache_stats()
            info["batch_invariant_decode"] = self.chat.batch_invariant
        if self.embedding is not None:
            info["inputs_queued"] = self.embedding.queued
            info["stats"] = dataclasses.asdict(self.embedding.stats)
            info.update(self.embedding.device_info())
        return info


class ModelRegistry:
    """Every model by id; `run()` (in a task group) loads, runs and unloads their engines."""

    def __init__(self, catalogue: Catalogue | None = None, settings: Settings | None = None
                 ) -> None:
        settings = settings or Settings()
        self.catalogue = catalogue or Catalogue([], None)
        self.limits = settings.limits()
        self.keep_alive_s = settings.keep_alive_s
        self.memory_budget_bytes = settings.memory_budget_mib * 2**20
        self.load_timeout_s = settings.load_timeout_s
        self.entries: dict[str, ModelEntry] = {}
        self.on_unload: list[Callable[[str], None]] = []  # e.g. the embedding cache's
        self.started = False  # the start-up models have had their load attempt
        self._tg: TaskGroup | None = None
        self._batch_observer: BatchObserverFactory | None = None
        self._run_observer: RunObserverFactory | None = None
        for source in self.catalogue.configured:
            self.entries[source.id] = ModelEntry(source.id, source.task, source,
                                                 status="loading")

    @classmethod
    def from_engines(cls, chat: list[ChatEngine], embedding: list[EmbeddingBatcher]
                     ) -> ModelRegistry:
        """For tests and embedding: engines built by the caller, served while the app runs."""
        registry = cls()
        engines: list[Engine] = [*chat, *embedding]
        for engine in engines:
            entry = ModelEntry(engine.model_id, "chat" if isinstance(engine, ChatEngine)
                               else "embedding", None, status="loading")
            if isinstance(engine, ChatEngine):
                entry.chat = engine
            else:
                entry.embedding = engine
            model_id = entry.id
            if model_id in registry.entries:
                entry.id = f"{model_id}-{len(registry.entries)}"
            registry.entries[entry.id] = entry
        return registry

    # --- the running registry ------------------------------------------------------------

    async def run(self, batch_observer: BatchObserverFactory | None = None,
                  run_observer: RunObserverFactory | None = None, *,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the engines given, load the start-up models, then unload idle ones until
        cancelled."""
        self._batch_observer, self._run_observer = batch_observer, run_observer
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            for entry in list(self.entries.values()):
                if entry.engine is not None:  # built by the caller
                    await self._start_engine(entry, entry.engine)
                else:
                    await self._load(entry)
            self.started = True
            while True:
                await anyio.sleep(REAP_INTERVAL_S)
                self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        for entry in self.entries.values():
            if entry.status != "ready" or entry.source is None:
                continue
            if not entry.idle:
                entry.last_used = now
                continue
            keep = entry.keep_alive_s if entry.keep_alive_s is not None else self.keep_alive_s
            if keep >= 0 and now - entry.last_used >= keep:
                log.info("model %s idle for %.0f s: unloading", entry.id, now - entry.last_used)
                self._spawn(self.unload, entry)

    def _spawn(self, func: Callable[[ModelEntry], Any], entry: ModelEntry) -> None:
        assert self._tg is not None
        self._tg.start_soon(func, entry)

    async def _start_engine(self, entry: ModelEntry, engine: Engine) -> None:
        assert self._tg is not None
        await self._tg.start(self._run_engine, entry, engine, name=f"engine:{entry.id}")
        entry.last_used = time.monotonic()
        entry.set_status("ready")
        log.info("model %s (%s) ready on %s", entry.id, entry.task, entry.provider)

    async def _run_engine(self, entry: ModelEntry, engine: Engine, *,
                          task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope() as scope:
            entry.scope = scope
            await engine.run(task_status=task_status)

    async def _load(self, entry: ModelEntry) -> None:
        """Load `entry` (whatever its status, unless ready) and start its engine."""
        if entry.status == "ready" or entry.source is None:
            return
        entry.set_status("loading")
        source = entry.source
        try:
            entry.expected_bytes = await anyio.to_thread.run_sync(expected_bytes, source)
            await self._make_room(entry)
            on_batch = self._batch_observer(entry.id) if self._batch_observer else None
            on_run = self._run_observer(entry.id) if self._run_observer else None
            engine = await anyio.to_thread.run_sync(load_engine, source, self.limits,
                                                    on_batch, on_run)
        except (InferenceError, APIError) as exc:
            log.error("model %s failed to load: %s", entry.id, exc.message)
            entry.set_status("failed", without_paths(exc.message))
            return
        except Exception as exc:  # a broken folder must not take the server down
            log.exception("model %s failed to load", entry.id)
            entry.set_status("failed", without_paths(f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(engine, ChatEngine):
            entry.chat = engine
        else:
            entry.embedding = engine
        await self._start_engine(entry, engine)

    async def _make_room(self, entry: ModelEntry) -> None:
        """Unload least recently used idle models until `entry` fits the memory budget."""
        budget = self.memory_budget_bytes
        if budget <= 0:
            return
        while True:
            used = sum(e.memory_bytes() for e in self.entries.values() if e is not entry)
            if used + entry.expected_bytes <= budget:
                return
            idle = sorted((e for e in self.entries.values()
                           if e is not entry and e.status == "ready" and e.idle
                           and e.source is not None), key=lambda e: e.last_used)
            if not idle:
                need = entry.expected_bytes // 2**20
                raise unavailable(f"model {entry.id} needs about {need} MiB; the memory "
                                  f"budget of {budget // 2**20} MiB is held by models in use",
                                  code="memory_budget_full")
            log.info("unloading %s to make room for %s", idle[0].id, entry.id)
            await self.unload(idle[0])

    async def unload(self, entry: ModelEntry) -> None:
        """Stop taking requests for `entry`, let its in-flight ones finish, free it."""
        if entry.source is None:
            raise bad_request(f"model {entry.id} was handed to the server already loaded "
                              "and cannot be unloaded", param="model", code="model_pinned")
        if entry.status != "ready":
            return
        with anyio.CancelScope(shield=True):  # a caller that leaves must not strand it
            entry.set_status("unloading")
            while not entry.idle:  # noqa: ASYNC110 - engines signal no idle event: poll
                await anyio.sleep(0.05)
            if entry.scope is not None:
                entry.scope.cancel()
            entry.chat = entry.embedding = None
            entry.scope = None
            for callback in self.on_unload:
                callback(entry.id)
            entry.set_status("unloaded")
        log.info("model %s unloaded", entry.id)

    # --- lookups ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Add catalogue models not seen yet (prepared while the server runs). The models
        directory is read in a worker thread."""
        for source in await anyio.to_thread.run_sync(self.catalogue.all):
            if source.id not in self.entries:
                self.entries[source.id] = ModelEntry(source.id, source.task, source)

    async def entry(self, model: str, task: Task | None = None) -> ModelEntry:
        """The entry for `model`; 404 if unknown, 400 if it serves another task."""
        entry = self.entries.get(model)
        if entry is None:
            await self.refresh()
            entry = self.entries.get(model)
        if entry is None:
            raise model_not_found(model)
        if task is not None and entry.task != task:
            served = "/v1/chat/completions" if entry.task == "chat" else "/v1/embeddings"
            raise bad_request(f"model {model} is a{'n' if entry.task == 'embedding' else ''} "
                              f"{entry.task} model; use it with {served}", param="model",
                              code="wrong_model_task")
        return entry

    async def ensure_loaded(self, entry: ModelEntry) -> None:
        """Wait for `entry` to be ready, loading it if needed, for up to load_timeout_s."""
        with anyio.move_on_after(self.load_timeout_s):
            while entry.status != "ready":
                if entry.status == "failed":
                    raise unavailable(f"model {entry.id} failed to load: {entry.error}",
                                      code="model_failed")
                if entry.status == "unloaded" and self._tg is not None \
                        and entry.source is not None:
                    self._spawn(self._load, entry)
                    entry.set_status("loading")
                await entry.changed.wait()
            return
        raise unavailable(f"model {entry.id} is still loading", code="model_loading")

    async def load(self, entry: ModelEntry) -> None:
        """An explicit load (admin): like a request's, and it retries a model that failed."""
        if entry.status == "failed":
            entry.set_status("unloaded")
        await self.ensure_loaded(entry)

    @staticmethod
    def check_access(tenant: Tenant, model: str) -> None:
        """Refuse `model` to a key limited to other models (before saying whether it exists)."""
        allowed = tenant.models
        if allowed is not None and model not in allowed:
            raise forbidden(f"this API key may not use model '{model}'; it may use "
                            f"{', '.join(sorted(allowed))}", code="model_not_allowed",
                            param="model")

    @asynccontextmanager
    async def use(self, model: str, task: Task, keep_alive_s: float | None = None, *,
                  tenant: Tenant = OPEN) -> AsyncIterator[Engine]:
        """The engine of `model`, loaded if need be; the model stays loaded while the block
        runs (hand the engine its work inside it). `tenant`: the caller, checked against the
        models it may use."""
        self.check_access(tenant, model)
        entry = await self.entry(model, task)
        await self.ensure_loaded(entry)
        # counted from here, not while waiting for the load: an unload in progress waits for
        # the requests it counts, and a request waiting for that unload must not be one
        entry.active += 1
        try:
            engine = entry.engine
            assert engine is not None
            entry.keep_alive_s = keep_alive_s  # as Ollama: each request's own, else default
            yield engine
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()

    def loaded_chat(self, model: str) -> ChatEngine | None:
        """The chat engine of `model` if it is loaded now (for cheap checks before a request
        is validated); None otherwise."""
        entry = self.entries.get(model)
        return entry.chat if entry is not None and entry.status == "ready" else None

    def loaded_embedding(self, model: str) -> EmbeddingBatcher | None:
        entry = self.entries.get(model)
        return entry.embedding if entry is not None and entry.status == "ready" else None

    # --- the whole server ------------------------------------------------------------------

    def idle(self) -> bool:
        """No generation or embedding is queued or running."""
        return all(e.idle for e in self.entries.values())

    def stop_all(self, error: InferenceError) -> None:
        """End all remaining work, telling each consumer `error` (shutdown)."""
        for entry in self.entries.values():
            if entry.chat is not None:
                entry.chat.stop_all(error)
            if entry.embedding is not None:
                entry.embedding.stop_all(error)

    def overall_status(self) -> str:
        """`loading` until the start-up models have had their try; then `ready`, `degraded`
        (some failed) or `failed` (all that were tried failed). Unloaded models count as
        servable: a request loads them."""
        if not self.started:
            return "loading"
        statuses = {e.status for e in self.entries.values()}
        if "failed" not in statuses:
            return "ready"
        return "degraded" if statuses - {"failed"} else "failed"


_PATH = re.compile(r"/(?:[^/\s'\":]+/)+([^/\s'\":]+)")


def without_paths(message: str) -> str:
    """A load error as callers see it (API errors, /health): each absolute path cut to its
    last part, so the server's file layout stays in its own log."""
    return _PATH.sub(r"\1", message)
