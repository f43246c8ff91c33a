"""The limits and tuning of the engines, each default declared once, here.

This module imports nothing heavy, so the command line can read these defaults without
loading onnxruntime. `server.settings.Settings` takes its defaults from these classes and
builds them from flags; the engines, the WebSocket and the tests all read them from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Static QNN shapes (batch, sequence) an embedding model is compiled for
DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = ((1, 32), (1, 128), (4, 64), (8, 128))


@dataclass(frozen=True)
class ChatLimits:
    """How one chat model's engine schedules (see `inference.chat.engine`)."""

    # Rows of the KV pool: choices decoding at once (benchmarks/chat_concurrency.py)
    max_running: int = 16
    # Generations queued for room; more get 429 (benchmarks/limits.py: the back of a full
    # queue starts within 30 s)
    max_waiting: int = 56
    # The most tokens a request may ask for, and what one that asks for none gets
    max_tokens_limit: int = 4096
    kv_budget_bytes: int = 2 * 1024**3  # the KV pool, per chat model
    prefill_chunk: int = 64  # prompt tokens per prefill run: running streams wait one chunk
    # ... and per prefill run while no stream decodes (nobody waits on it): fewer, larger
    # runs read a 1,500-token prompt 1.11x faster (docs/decisions/0006-prefill.md)
    prefill_chunk_idle: int = 512
    prompt_cache: bool = True  # keep prompt prefixes in the pool for the next turn
    # What kept prefixes may hold of the KV budget (the attack run saw 14 entries hold
    # 603 MiB, and rising): about 5,700 tokens of SmolLM2-135M's fp32 KV
    prompt_cache_bytes: int = 256 * 2**20
    # A generation whose consumer has this many undelivered deltas per choice waits for it
    # (a second or two of tokens: streaming clients that read never get near it) ...
    unread_per_choice: int = 64
    stall_s: float = 60.0  # ... and is cancelled once it has waited this long
    round_s: float = 0.25  # a device-thread turn's length: how long shutdown may wait for it
    # While another tenant (API key) has sent work within `tenant_window_s`, a tenant may hold
    # at most `max_running - tenant_reserve_rows` rows: the rest are kept for the others, whose
    # requests then start at once instead of after a wave of the flood's streams
    # (benchmarks/tenants.py). A lone tenant uses every row.
    tenant_reserve_rows: int = 1
    tenant_window_s: float = 60.0


@dataclass(frozen=True)
class EmbeddingLimits:
    """How one embedding model's batcher batches (see `inference.embed.batcher`)."""

    max_batch_size: int = 32  # inputs per model run; 1 turns batching off
    max_batch_tokens: int = 16384  # padded tokens per model run
    max_queued_inputs: int = 2048  # inputs queued; more get 429


@dataclass(frozen=True)
class QnnOptions:
    """How to build QNN buckets."""

    buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS
    max_npu_batch: int = 8  # larger batches run on the CPU
    extra: dict[str, str] = field(default_factory=dict)
