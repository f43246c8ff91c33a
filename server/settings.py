"""Server configuration: one frozen dataclass, filled from flags and environment variables.

Every default is declared once: the engines' limits in `inference.limits` (which these fields
take theirs from), the server's own here. The command line takes its defaults from here.
This module imports nothing heavy: `npugate prepare` and `--help` load no runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from inference.limits import ChatLimits, EmbeddingLimits, QnnOptions
from inference.prepare import default_models_dir


def default_data_dir() -> Path:
    """`$NPUGATE_DATA_DIR`, else a per-user data directory (stored responses live here)."""
    env = os.environ.get("NPUGATE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "npugate"


_CHAT = ChatLimits()
_EMBEDDING = EmbeddingLimits()
_QNN = QnnOptions()


@dataclass(frozen=True)
class ModelLimits:
    """What loading a model builds its engine with, from Settings."""

    chat: ChatLimits
    embedding: EmbeddingLimits
    embedding_device: str
    qnn: QnnOptions
    qnn_cache_dir: Path | None = None


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` and `serve` need. Defaults suit a 2-core laptop."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    chat_models: tuple[Path, ...] = ()
    embedding_models: tuple[Path, ...] = ()
    embedding_device: str = "auto"  # auto | cpu | qnn
    embedding_max_batch: int = _EMBEDDING.max_batch_size  # 1 turns batching off
    embedding_batch_tokens: int = _EMBEDDING.max_batch_tokens
    embedding_max_queued: int = _EMBEDDING.max_queued_inputs
    embedding_max_inputs: int = 2048
    embedding_cache_mib: int = 64  # LRU of vectors by model and input; 0 turns it off
    # Models on demand (docs/configuration.md): idle models unload after keep_alive_s
    # (negative: never); loaded models stay within memory_budget_mib (0: no budget); a
    # request waits at most load_timeout_s for its model to load (503 with Retry-After after)
    keep_alive_s: float = 300.0
    memory_budget_mib: int = 0
    load_timeout_s: float = 60.0
    admin_keys: tuple[str, ...] = ()  # keys for /v1/admin/*; empty: those endpoints are off
    qnn_buckets: tuple[tuple[int, int], ...] = tuple(_QNN.buckets)
    qnn_max_batch: int = _QNN.max_npu_batch
    models_dir: Path = field(default_factory=default_models_dir)
    max_running_per_model: int = _CHAT.max_running  # choices decoding at once
    kv_budget_mib: int = _CHAT.kv_budget_bytes // 2**20  # per chat model
    prefill_chunk: int = _CHAT.prefill_chunk  # prompt tokens per prefill run
    prompt_cache: bool = _CHAT.prompt_cache  # keep prompt prefixes in the KV pool
    prompt_cache_mib: int = _CHAT.prompt_cache_bytes // 2**20  # of the KV budget, at most
    max_waiting_per_model: int = _CHAT.max_waiting
    max_body_bytes: int = 4 * 1024 * 1024
    # URL plus headers; larger gets 431. Hypercorn buffers up to 8x this (see serve.py).
    max_header_bytes: int = 32 * 1024
    max_messages: int = 2048  # per chat request; also content parts (benchmarks/limits.py)
    max_tokens_limit: int = _CHAT.max_tokens_limit  # cap, and default when a request omits it
    # Idle connections (and trickled headers) close after this. Above the 5 s idle expiry of
    # httpx and the OpenAI SDKs, so a client never reuses a connection the server is closing.
    keep_alive_timeout_s: float = 15.0
    body_timeout_s: float = 30.0  # a request body must arrive within this (408 otherwise)
    sse_ping_interval_s: float = 15.0
    ws_max_message_bytes: int = 4 * 1024 * 1024  # as max_body_bytes; larger: an error event
    ws_max_conversations: int = _CHAT.max_running  # per socket, as max_running
    ws_send_queue: int = 256  # messages buffered per socket
    ws_ping_interval_s: float = 20.0
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    protect_health: bool = False  # health probes need a key too
    cors_origins: tuple[str, ...] = ()  # empty: same-origin only
    # Host names answered besides loopback ones, when bound to a loopback address ("*": any)
    allowed_hosts: tuple[str, ...] = ()
    shutdown_grace_s: float = 30.0  # in-flight work may finish this long after SIGTERM
    # Stored responses (/v1/responses): "" is SQLite in data_dir; "sqlite:///PATH" or
    # "postgresql://..." (shared by replicas). Oldest go first past either bound (0: none).
    data_dir: Path = field(default_factory=default_data_dir)
    response_store: str = ""
    response_max_age_s: float = 30 * 86400.0
    response_store_mib: int = 1024
    dashboard_sample_s: float = 5.0  # the dashboard's points are this far apart (an hour kept)

    def limits(self) -> ModelLimits:
        return ModelLimits(
            chat=replace(
                _CHAT, max_running=self.max_running_per_model,
                max_waiting=self.max_waiting_per_model, max_tokens_limit=self.max_tokens_limit,
                kv_budget_bytes=self.kv_budget_mib * 2**20, prefill_chunk=self.prefill_chunk,
                prompt_cache=self.prompt_cache,
                prompt_cache_bytes=min(self.prompt_cache_mib, self.kv_budget_mib) * 2**20),
            embedding=EmbeddingLimits(max_batch_size=self.embedding_max_batch,
                                      max_batch_tokens=self.embedding_batch_tokens,
                                      max_queued_inputs=self.embedding_max_queued),
            embedding_device=self.embedding_device,
            qnn=QnnOptions(buckets=self.qnn_buckets, max_npu_batch=self.qnn_max_batch),
            qnn_cache_dir=self.models_dir / ".qnn-cache")
