"""The embedding cache: LRU bounds in bytes, and answers identical with and without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from quart import Quart

from inference.embed.cache import ENTRY_OVERHEAD, EmbeddingCache
from inference.embed.model import EmbeddingModel
from server.settings import Settings
from tests.conftest import serving

MODEL = "all-minilm-l6-v2"


def _vec(x: float) -> np.ndarray:  # type: ignore[type-arg]
    return np.full(4, x, dtype=np.float32)


def test_lru_is_bounded_in_bytes_and_evicts_the_least_recent() -> None:
    entry = 16 + ENTRY_OVERHEAD + 1  # a 4-float vector, a 1-byte text
    cache = EmbeddingCache(3 * entry)
    for name in "abc":
        cache.put(cache.key("m", name), _vec(ord(name)), 1)
    assert cache.stats.entries == 3 and cache.stats.bytes == 3 * entry
    assert cache.get(cache.key("m", "a")) is not None  # "a" is now the most recent
    cache.put(cache.key("m", "d"), _vec(1), 1)
    assert cache.get(cache.key("m", "b")) is None  # "b" was the least recent: evicted
    assert cache.get(cache.key("m", "a")) is not None and cache.stats.evictions == 1
    assert cache.stats.bytes <= cache.max_bytes and cache.stats.entries == 3
    # keyed by model and exact input: other models, other spellings and token ids differ
    assert cache.get(cache.key("other", "a")) is None
    assert cache.get(cache.key("m", "a ")) is None
    assert cache.get(cache.key("m", [97])) is None
    cache.put(cache.key("m", [97]), _vec(5), 1)
    got = cache.get(cache.key("m", [97]))
    assert got is not None and got[0][0] == 5 and not got[0].flags.writeable
    cache.drop_model("m")
    assert cache.stats.entries == 0 and cache.stats.bytes == 0


def test_a_zero_budget_turns_it_off_and_oversized_entries_are_not_kept() -> None:
    off = EmbeddingCache(0)
    off.put(off.key("m", "a"), _vec(1), 1)
    assert not off.enabled and off.get(off.key("m", "a")) is None
    assert off.stats.misses == 0  # not even counted
    tiny = EmbeddingCache(10)
    tiny.put(tiny.key("m", "a"), _vec(1), 1)
    assert tiny.stats.entries == 0


@pytest.fixture
async def apps(minilm: EmbeddingModel) -> AsyncIterator[tuple[Quart, Quart]]:
    async with serving(Settings(embedding_cache_mib=1), embedding=[minilm]) as cached, \
            serving(Settings(embedding_cache_mib=0), embedding=[minilm]) as plain:
        yield cached, plain


async def _post(app: Quart, body: dict[str, Any]) -> Any:
    resp = await app.test_client().post("/v1/embeddings", json=body)
    assert resp.status_code == 200, await resp.get_data()
    return await resp.get_json()


@pytest.mark.anyio
async def test_answers_are_identical_with_and_without_the_cache(
        apps: tuple[Quart, Quart]) -> None:
    cached, plain = apps
    bodies: list[dict[str, Any]] = [
        {"input": ["the cat sat", "a dog ran", "the cat sat"]},  # a repeat inside one request
        {"input": "the cat sat"},  # a hit from the last request
        {"input": ["a dog ran", "something new"], "encoding_format": "base64"},
        {"input": [[101, 2000, 102], [2000]]},  # token ids: their own keys
        {"input": [[101, 2000, 102]]},
    ]
    for body in bodies:
        body = {"model": MODEL, **body}
        assert await _post(cached, body) == {**await _post(plain, body)}
    cache = cached.extensions["npugate"].embedding_cache
    assert (cache.stats.hits, cache.stats.misses) == (3, 6)  # a repeat within a request misses
    batcher = cached.extensions["npugate"].registry.entries[MODEL].embedding
    assert batcher.stats.inputs_total == 5  # ... but is computed once
    health = await (await cached.test_client().get("/health")).get_json()
    assert health["embedding_cache"]["hits"] == cache.stats.hits
    assert health["embedding_cache"]["bytes"] == cache.stats.bytes > 0
    metrics = (await (await cached.test_client().get("/metrics")).get_data()).decode()
    assert f"npugate_embedding_cache_hits_total {float(cache.stats.hits)}" in metrics
    assert "npugate_embedding_cache_bytes" in metrics


@pytest.mark.anyio
async def test_hits_skip_tokenizing_and_the_batcher(apps: tuple[Quart, Quart],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cached, _ = apps
    await _post(cached, {"model": MODEL, "input": "warm me up"})
    batcher = cached.extensions["npugate"].registry.entries[MODEL].embedding
    runs = batcher.stats.model_runs_total

    def no_tokenizing(*args: Any) -> Any:
        raise AssertionError("a hit must not tokenize")

    monkeypatch.setattr(batcher.model, "tokenize", no_tokenizing)
    body = await _post(cached, {"model": MODEL, "input": ["warm me up", "warm me up"]})
    assert batcher.stats.model_runs_total == runs
    assert body["usage"]["prompt_tokens"] == 2 * 5  # [CLS] warm me up [SEP], twice


@pytest.mark.anyio
async def test_dimensions_are_cut_after_the_cache(minilm: EmbeddingModel) -> None:
    """One cached full vector serves every `dimensions` (on a model that allows them)."""
    spec = minilm.spec
    object.__setattr__(spec, "matryoshka", True)
    try:
        async with serving(Settings(embedding_cache_mib=1), embedding=[minilm]) as app:
            full = await _post(app, {"model": MODEL, "input": "shorten me"})
            short = await _post(app, {"model": MODEL, "input": "shorten me", "dimensions": 8})
        want = np.asarray(full["data"][0]["embedding"][:8])
        np.testing.assert_allclose(short["data"][0]["embedding"], want / np.linalg.norm(want),
                                   rtol=1e-6)
    finally:
        object.__setattr__(spec, "matryoshka", False)
