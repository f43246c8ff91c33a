"""A bounded LRU of embedding vectors, keyed by scope, model and exact input.

The scope is whose entry it is (the server derives it from the API key): a request under
another key neither hits it nor can time it. Then the model id and the input as the request
gave it: a text (exact, so "a" and "a "
are different inputs) or a token-id list. Vectors are stored at the model's full dimension,
as the model computed them; `dimensions` shortens them after the cache, so one entry serves
every `dimensions` (nothing else changes a vector). The bound is in bytes: each entry counts
its vector, its key and `ENTRY_OVERHEAD` for the bookkeeping. A hit skips tokenizing and the
batcher; the entry also keeps the input's token count, for `usage`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from inference.embed.model import Vector

ENTRY_OVERHEAD = 200  # bytes of dict, tuple and array headers per entry, roughly
Key = tuple[str, str, str | tuple[int, ...]]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class EmbeddingCache:
    """LRU of (vector, token count) by (model, input), within `max_bytes` (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.stats = CacheStats()
        self._entries: OrderedDict[Key, tuple[Vector, int, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def key(model: str, item: str | Sequence[int], scope: str = "") -> Key:
        return (scope, model, item if isinstance(item, str) else tuple(item))

    def get(self, key: Key) -> tuple[Vector, int] | None:
        """The vector and token count cached for `key`, counting a hit or a miss."""
        if not self.enabled:
            return None
        found = self._entries.get(key)
        if found is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return found[0], found[1]

    def put(self, key: Key, vector: Vector, tokens: int) -> None:
        if not self.enabled:
            return
        item = key[2]
        size = vector.nbytes + ENTRY_OVERHEAD + (
            len(item.encode()) if isinstance(item, str) else 8 * len(item))
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.stats.bytes -= old[2]
        vector = vector.copy()
        vector.flags.writeable = False  # shared by every hit
        self._entries[key] = (vector, tokens, size)
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.stats.bytes -= dropped
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def drop_model(self, model: str) -> None:
        """Forget a model's vectors (it was unloaded, and may come back changed)."""
        for key in [k for k in self._entries if k[1] == model]:
            self.stats.bytes -= self._entries.pop(key)[2]
        self.stats.entries = len(self._entries)
