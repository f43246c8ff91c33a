"""A queue that serves tenants in turn: waiting work by tenant (the server's cache scope, one
per API key), taken round-robin, so one tenant's flood cannot starve another's single request.
Within a tenant, first come, first served. Used by the chat engine's admission; not
thread-safe (its owner's thread only)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, tenant: Callable[[T], str]) -> None:
        self._tenant = tenant
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()  # in turn order
        self._size = 0

    def append(self, item: T) -> None:
        self._queues.setdefault(self._tenant(item), deque()).append(item)
        self._size += 1

    def heads(self) -> Iterator[tuple[str, T]]:
        """Each tenant's oldest item, the tenant whose turn it is first."""
        for tenant, queue in self._queues.items():
            yield tenant, queue[0]

    def peek(self) -> T:
        """The next item: the oldest of the tenant whose turn it is."""
        return next(iter(self._queues.values()))[0]

    def pop(self, tenant: str | None = None) -> T:
        """Take the oldest item of `tenant` (default: the tenant whose turn it is); the turn
        passes to the next tenant."""
        tenant = next(iter(self._queues)) if tenant is None else tenant
        queue = self._queues[tenant]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]
        return item

    def drop(self, tenant: str | None = None) -> T:
        """Take the oldest item of `tenant` (default: whose turn it is) without passing the
        turn: it was cancelled, not served."""
        tenant = next(iter(self._queues)) if tenant is None else tenant
        queue = self._queues[tenant]
        item = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[tenant]
        return item

    def clear(self) -> None:
        self._queues.clear()
        self._size = 0

    def tenants(self) -> int:
        return len(self._queues)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues.values():
            yield from queue
