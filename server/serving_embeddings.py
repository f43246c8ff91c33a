"""Embeddings service: turns a parsed request into batcher calls and an OpenAI response.

Inputs longer than the model's maximum length are rejected with 400
`context_length_exceeded` (never silently truncated), the same for text and token-id inputs.
"""

from __future__ import annotations

import base64
from typing import Any

import anyio
import numpy as np

from inference.embed.model import Vector
from server.errors import APIError, bad_request
from server.protocol import EmbeddingRequest, parse_model
from server.registry import ModelRegistry

INLINE_TOKENIZE_CHARS = 2048


class EmbeddingService:
    """Serves `/v1/embeddings` from the registry's batchers."""

    def __init__(self, registry: ModelRegistry, *, max_inputs: int = 2048) -> None:
        self._registry = registry
        self.max_inputs = max_inputs

    def parse(self, body: dict[str, Any]) -> EmbeddingRequest:
        """Validate a decoded request body. Counts and token-id lengths are checked first:
        validation costs event-loop time per item (1.6 s for 4 MiB of one-id lists)."""
        raw = body.get("input")
        if isinstance(raw, list) and raw:
            lists = [raw] if isinstance(raw[0], int) else raw
            if len(lists) > self.max_inputs:
                raise APIError(413, f"input has {len(lists)} items; at most {self.max_inputs} "
                               "are allowed per request", param="input",
                               code="too_many_inputs")
            if isinstance(body.get("model"), str):
                model = self._registry.embedding_batcher(body["model"]).model
                for i, ids in enumerate(lists):
                    if isinstance(ids, list):
                        model.check_length(ids, i)
        return parse_model(EmbeddingRequest, body)

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        batcher = self._registry.embedding_batcher(req.model)
        model = batcher.model
        items = req.inputs()
        if req.dimensions is not None and req.dimensions != model.spec.dimension:
            if not model.spec.matryoshka:
                raise bad_request(f"model {req.model} does not support shortened embeddings; "
                                  f"omit dimensions (it is {model.spec.dimension})",
                                  param="dimensions")
            if req.dimensions > model.spec.dimension:
                raise bad_request(f"dimensions must be at most {model.spec.dimension}",
                                  param="dimensions")
        if isinstance(items[0], str):
            for i, text in enumerate(items):
                model.check_text_size(text, i)
            # Short inputs tokenize faster than a thread hop costs; long ones leave the loop.
            chars = sum(len(x) for x in items)
            ids = (model.tokenize(items) if chars <= INLINE_TOKENIZE_CHARS
                   else await anyio.to_thread.run_sync(model.tokenize, items))
        else:
            ids = [model.wrap_ids(x) for x in items]
        for i, x in enumerate(ids):
            model.check_length(x, i)
        vectors = await batcher.embed(ids)
        tokens = sum(len(x) for x in ids)
        return {
            "object": "list", "model": req.model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": _encode(_shorten(v, req.dimensions), req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
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
