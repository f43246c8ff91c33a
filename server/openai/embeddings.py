"""Embeddings service: turns a parsed request into batcher calls and an OpenAI response.

Inputs longer than the model's maximum length are rejected with 400
`context_length_exceeded` (never silently truncated), the same for text and token-id inputs.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.embed.batcher import EmbeddingBatcher
from inference.embed.cache import EmbeddingCache
from inference.embed.model import Vector
from server.core.errors import bad_request, too_large
from server.core.metrics import Metrics
from server.core.registry import ModelRegistry
from server.core.tenant import Tenant
from server.openai.wire import EmbeddingRequest, parse_model
from server.tenants.limits import Gate


class EmbeddingService:
    """Serves `/v1/embeddings` from the registry's batchers, through the embedding cache."""

    def __init__(self, registry: ModelRegistry, *, max_inputs: int,
                 cache: EmbeddingCache | None = None, gate: Gate | None = None,
                 metrics: Metrics | None = None) -> None:
        self._registry = registry
        self._gate = gate or Gate()
        self._metrics = metrics
        self.max_inputs = max_inputs
        self.cache = cache or EmbeddingCache(0)

    def parse(self, body: dict[str, Any]) -> EmbeddingRequest:
        """Validate a decoded request body. Counts and token-id lengths are checked first:
        validation costs event-loop time per item (1.6 s for 4 MiB of one-id lists)."""
        raw = body.get("input")
        if isinstance(raw, list) and raw:
            lists = [raw] if isinstance(raw[0], int) else raw
            if len(lists) > self.max_inputs:
                raise too_large(f"input has {len(lists)} items; at most {self.max_inputs} "
                                "are allowed per request", param="input",
                                code="too_many_inputs")
            model = body.get("model")
            batcher = self._registry.loaded_embedding(model) if isinstance(model, str) \
                else None
            if batcher is not None:  # else the lengths are checked once it is loaded
                batcher.check_token_lists(lists)
        return parse_model(EmbeddingRequest, body)

    async def embed(self, req: EmbeddingRequest, tenant: Tenant) -> dict[str, Any]:
        """The vectors of a parsed request of `tenant` (within its limits); cached ones only
        from its scope."""
        async with self._gate.admitted(tenant) as lease, \
                self._registry.use(req.model, "embedding", req.keep_alive_seconds(),
                                   tenant=tenant) as batcher:
            assert isinstance(batcher, EmbeddingBatcher)
            vectors, tokens = await self._vectors(req, batcher, tenant)
        lease.finish(prompt_tokens=sum(tokens))
        return _response(req, vectors, tokens)

    async def _vectors(self, req: EmbeddingRequest, batcher: EmbeddingBatcher, tenant: Tenant
                       ) -> tuple[list[Vector | None], list[int]]:
        """Each input's vector and token count: from the cache, else from the batcher."""
        items = req.inputs()
        if req.dimensions is not None and req.dimensions != batcher.dimension:
            if not batcher.matryoshka:
                raise bad_request(f"model {req.model} does not support shortened embeddings; "
                                  f"omit dimensions (it is {batcher.dimension})",
                                  param="dimensions")
            if req.dimensions > batcher.dimension:
                raise bad_request(f"dimensions must be at most {batcher.dimension}",
                                  param="dimensions")
        vectors: list[Vector | None] = [None] * len(items)
        tokens = [0] * len(items)
        keys = [self.cache.key(req.model, x, tenant.scope) for x in items] \
            if self.cache.enabled else []
        for i, key in enumerate(keys):  # hits skip tokenizing and the batcher
            found = self.cache.get(key)
            if found is not None:
                vectors[i], tokens[i] = found
        inputs: list[str | Sequence[int]] = list(items)
        misses = [(i, x) for i, x in enumerate(inputs) if vectors[i] is None]
        if keys and self._metrics is not None:
            self._metrics.count_embedding_cache(tenant.name, len(keys) - len(misses),
                                                len(misses))
        if misses:
            # an input repeated within the request is computed once
            slots: dict[str | tuple[int, ...], int] = {}
            todo: list[tuple[int, str | Sequence[int]]] = []
            for i, x in misses:
                if slots.setdefault(x if isinstance(x, str) else tuple(x), len(todo)) \
                        == len(todo):
                    todo.append((i, x))
            ids = await batcher.tokenize(todo)
            computed = await batcher.embed(ids, tenant=tenant.scope, weight=tenant.weight)
            for i, x in misses:
                slot = slots[x if isinstance(x, str) else tuple(x)]
                vectors[i], tokens[i] = computed[slot], len(ids[slot])
                if keys:
                    self.cache.put(keys[i], computed[slot], len(ids[slot]))
        return vectors, tokens


def _response(req: EmbeddingRequest, vectors: list[Vector | None], tokens: list[int]
              ) -> dict[str, Any]:
    used = sum(tokens)
    return {
        "object": "list", "model": req.model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": _encode(_shorten(v, req.dimensions), req.encoding_format)}
                 for i, v in enumerate(vectors) if v is not None],
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


def _shorten(vector: Vector, dimensions: int | None) -> Vector:
    if dimensions is None or dimensions >= vector.shape[0]:
        return vector
    cut = vector[:dimensions]
    return cut / max(float(np.linalg.norm(cut)), 1e-12)


def _encode(vector: Vector, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the official SDK asks for: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()  # type: ignore[no-any-return]
