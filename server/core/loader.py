"""Loading one catalogued model into a running engine (blocking: call it off the event loop),
and what a model is expected to cost in memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from inference.chat.engine import ChatEngine, RunObserver
from inference.chat.model import ChatModel
from inference.embed.batcher import EmbeddingBatcher
from inference.embed.model import EmbeddingModel
from server.core.catalogue import CatalogueEntry
from server.settings import ModelLimits

BatchObserver = Callable[[int, int, float], None]
# What loading costs beyond the weight files, measured as the growth of a fresh process's RSS
# (docs/configuration.md): SmolLM2 237 MiB for 259 MiB of int8 weights (0.92x, its external
# data is mapped as read), all-MiniLM-L6-v2 133 MiB for 86 (1.54x), and a fixed 28-35 MiB for
# the tiny test models (tokenizer, session, arenas). The estimate errs high: 1.5x plus 32 MiB.
LOAD_FACTOR = 1.5
FIXED_BYTES = 32 * 2**20


def weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's ONNX files and external weights."""
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")))


def expected_bytes(entry: CatalogueEntry) -> int:
    """Memory a loaded model is expected to hold (a chat model's KV pool grows within
    --kv-budget on top, and is counted as it grows)."""
    return int(weights_bytes(entry.path) * LOAD_FACTOR) + FIXED_BYTES


def load_engine(entry: CatalogueEntry, limits: ModelLimits,
                on_batch: BatchObserver | None = None,
                on_run: RunObserver | None = None) -> ChatEngine | EmbeddingBatcher:
    """Load `entry` and build its engine (not yet running). Raises InferenceError."""
    if entry.task == "chat":
        model = ChatModel.load(entry.path, model_id=entry.id)
        return ChatEngine(model, limits.chat, on_run=on_run)
    cache = limits.qnn_cache_dir / entry.id if limits.qnn_cache_dir else None
    emb = EmbeddingModel.load(entry.path, model_id=entry.id, device=limits.embedding_device,
                              cache_dir=cache, qnn=limits.qnn)
    return EmbeddingBatcher(emb, limits.embedding, on_batch=on_batch)
