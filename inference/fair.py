"""A queue that serves tenants in turn: waiting work by tenant (the server's cache scope, one
per API key), taken in weighted turns, so one tenant's flood cannot starve another's single
request. Within a tenant, first come, first served. Used by the chat engine's admission; not
thread-safe (its owner's thread only).

Turns are kept as virtual finish times (weighted fair queuing): an item's tag is its
tenant's previous tag, or the clock if later, plus 1/weight; the smallest tag goes first and
the clock moves to it. With equal weights that is round-robin; a tenant of weight 2 takes two
turns to another's one. A tenant whose queue empties keeps no credit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, tenant: Callable[[T], str],
                 weight: Callable[[T], float] = lambda _: 1.0) -> None:
        self._tenant = tenant
        self._weight = weight
        self._queues: dict[str, deque[tuple[float, int, T]]] = {}  # (tag, seq, item)
        self._clock = 0.0
        self._seq = 0
        self._size = 0

    def append(self, item: T) -> None:
        tenant = self._tenant(item)
        queue = self._queues.setdefault(tenant, deque())
        last = queue[-1][0] if queue else self._clock
        self._seq += 1
        queue.append((max(last, self._clock) + 1.0 / max(self._weight(item), 1e-6),
                      self._seq, item))
        self._size += 1

    def _order(self) -> list[str]:
        return sorted(self._queues, key=lambda t: self._queues[t][0][:2])

    def heads(self) -> Iterator[tuple[str, T]]:
        """Each tenant's oldest item, the tenant whose turn it is first."""
        for tenant in self._order():
            yield tenant, self._queues[tenant][0][2]

    def peek(self) -> T:
        """The next item: the oldest of the tenant whose turn it is."""
        return self._queues[self._order()[0]][0][2]

    def pop(self, tenant: str | None = None) -> T:
        """Take the oldest item of `tenant` (default: the tenant whose turn it is); the clock
        moves to its turn."""
        tag, _, item = self._take(tenant)
        self._clock = max(self._clock, tag)
        return item

    def drop(self, tenant: str | None = None) -> T:
        """Take the oldest item of `tenant` (default: whose turn it is) without spending its
        turn: it was cancelled, not served, so the tenant's later items move up."""
        tenant = self._order()[0] if tenant is None else tenant
        tag, _, item = self._take(tenant)
        queue = self._queues.get(tenant)
        if queue:
            step = 1.0 / max(self._weight(item), 1e-6)
            self._queues[tenant] = deque((t - step, s, x) for t, s, x in queue)
        return item

    def _take(self, tenant: str | None) -> tuple[float, int, T]:
        tenant = self._order()[0] if tenant is None else tenant
        queue = self._queues[tenant]
        taken = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[tenant]
        return taken

    def clear(self) -> None:
        self._queues.clear()
        self._size = 0

    def tenants(self) -> int:
        return len(self._queues)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues.values():
            for _, _, item in queue:
                yield item
