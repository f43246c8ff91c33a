"""Who a request's key belongs to, and the books its work is kept in: the key file's tenants,
the database's keys, the limits gate and usage by day."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from server.core.database import Database
from server.core.security import APIKeys
from server.core.tenant import OPEN, Tenant
from server.tenants import keys, usage
from server.tenants.keys import KEY_PREFIX, KeyStore
from server.tenants.limits import Gate
from server.tenants.usage import UsageBook

SCHEMA = (*keys.SCHEMA, *usage.SCHEMA)


class Tenants:
    def __init__(self, db: Database, file_keys: APIKeys) -> None:
        self.file_keys = file_keys
        self.keys = KeyStore(db)
        self.usage = UsageBook(db)
        self.gate = Gate(self.usage)

    async def resolve(self, key: str | None) -> Tenant | None:
        """The tenant of `key` (`OPEN` on a server with no keys, in the file or the
        database), else None: refuse it. A database key is looked up each time, so a revoked
        one fails at once."""
        if key and key.startswith(KEY_PREFIX):
            record = await self.keys.lookup(key)
            if record is not None:
                return record.tenant()
        if self.file_keys.enabled:
            return self.file_keys.tenant(key)
        return None if await self.keys.any_keys() else OPEN

    @asynccontextmanager
    async def keep_books(self, every_s: float) -> AsyncIterator[None]:
        """While the server runs, write usage every `every_s`; and once more at the end."""
        async with anyio.create_task_group() as tg:
            async def flush_often() -> None:
                while True:
                    await anyio.sleep(every_s)
                    await self.usage.flush()

            tg.start_soon(flush_often)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.usage.flush()
