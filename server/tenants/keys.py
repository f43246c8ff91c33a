"""API keys in the database: each one a tenant with its own limits (`server.core.tenant`).

A key is shown once, when it is created. The database keeps a SHA-256 hash of it (the keys
are 256 random bits, so a fast hash is as safe as a slow one), its first characters to tell
keys apart, and its tenant. A request's key is looked up by its hash on every request, so a
revoked key fails at its next request, on every replica that shares the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from server.core.database import Database, DatabaseUnavailable
from server.core.security import key_scope, shared_scope
from server.core.tenant import Limits, Tenant

SCHEMA = ("""
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    shared_scope TEXT,
    models TEXT,
    limits TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
)""",)
KEY_PREFIX = "npg-"
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # a /metrics label value and a usage row
NO_LIMITS = Limits()
COLUMNS = "id, prefix, name, scope, shared_scope, models, limits, weight, created_at, revoked_at"


class KeyRequestError(ValueError):
    """A key request that cannot be carried out (a 400 or 409 to the admin)."""

    def __init__(self, message: str, *, conflict: bool = False, param: str | None = None
                 ) -> None:
        super().__init__(message)
        self.conflict = conflict
        self.param = param


@dataclass(frozen=True)
class KeyRecord:
    id: str
    prefix: str  # the key's first characters
    name: str
    scope: str
    shared_scope: str | None  # the scope NAME it shares, if any
    models: tuple[str, ...] | None
    limits: Limits
    weight: float
    created_at: float
    revoked_at: float | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> KeyRecord:
        (id, prefix, name, scope, shared, models, limits, weight, created, revoked) = row
        return cls(id, prefix, name, scope, shared,
                   None if models is None else tuple(orjson.loads(models)),
                   Limits.from_dict(orjson.loads(limits)), float(weight), float(created),
                   None if revoked is None else float(revoked))

    def tenant(self) -> Tenant:
        return Tenant(self.name, self.scope,
                      None if self.models is None else frozenset(self.models), self.limits,
                      self.weight, self.id)

    def describe(self) -> dict[str, Any]:
        """The key as the admin API shows it: never the key or its hash."""
        return {"object": "api_key", "id": self.id, "name": self.name,
                "key_prefix": self.prefix, "scope": self.shared_scope,
                "models": None if self.models is None else list(self.models),
                **self.limits.to_dict(), "weight": self.weight,
                "created_at": int(self.created_at),
                "revoked_at": None if self.revoked_at is None else int(self.revoked_at),
                "status": "revoked" if self.revoked_at is not None else "active"}


def key_hash(key: str) -> str:
    return hashlib.sha256(b"npugate api key\0" + key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._checked = -1e9
        self._any = False

    async def create(self, name: str, *, models: tuple[str, ...] | None = None,
                     limits: Limits = NO_LIMITS, weight: float = 1.0,
                     scope: str | None = None) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown this once)."""
        if not NAME.match(name):
            raise KeyRequestError("name must be 1 to 64 letters, digits, '.', '_' or '-'",
                            param="name")
        if scope is not None and not NAME.match(scope):
            raise KeyRequestError("scope must be 1 to 64 letters, digits, '.', '_' or '-'",
                            param="scope")
        if not weight > 0 or weight > 1000:
            raise KeyRequestError("weight must be above 0 and at most 1000", param="weight")
        if any(v < 0 for v in limits.to_dict().values()):
            raise KeyRequestError("limits must be 0 (none) or positive")
        if await self.db.fetch("SELECT id FROM api_keys WHERE name = ?", name):
            raise KeyRequestError(f"a key named {name!r} exists; revoked keys keep their names",
                            conflict=True, param="name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            "key_" + secrets.token_hex(8), key[:len(KEY_PREFIX) + 4], name,
            key_scope(key) if scope is None else shared_scope(scope), scope,
            None if models is None else tuple(models), limits, float(weight), time.time(),
            None)
        await self.db.fetch(
            f"INSERT INTO api_keys (hash, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            key_hash(key), record.id, record.prefix, record.name, record.scope,
            record.shared_scope,
            None if record.models is None else orjson.dumps(list(record.models)).decode(),
            orjson.dumps(record.limits.to_dict()).decode(), record.weight,
            record.created_at, None)
        self._any = True
        return record, key

    async def lookup(self, key: str) -> KeyRecord | None:
        """The active key `key` is, else None."""
        if not key.startswith(KEY_PREFIX):
            return None
        rows = await self.db.fetch(f"SELECT {COLUMNS} FROM api_keys WHERE hash = ? "
                                   "AND revoked_at IS NULL", key_hash(key))
        return KeyRecord.from_row(rows[0]) if rows else None

    async def list(self) -> list[KeyRecord]:
        rows = await self.db.fetch(f"SELECT {COLUMNS} FROM api_keys ORDER BY created_at")
        return [KeyRecord.from_row(row) for row in rows]

    async def get(self, id_or_name: str) -> KeyRecord | None:
        rows = await self.db.fetch(f"SELECT {COLUMNS} FROM api_keys WHERE id = ? OR name = ?",
                                   id_or_name, id_or_name)
        return KeyRecord.from_row(rows[0]) if rows else None

    async def revoke(self, id_or_name: str) -> KeyRecord | None:
        """Revoke a key (at once: its next request fails); None if there is no such key."""
        found = await self.get(id_or_name)
        if found is None:
            return None
        if found.revoked_at is None:
            await self.db.fetch("UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                                time.time(), found.id)
        return await self.get(found.id)

    async def any_keys(self, max_age_s: float = 2.0) -> bool:
        """Whether the database holds any key, revoked ones included, checked at most every
        `max_age_s`: a server that has had keys needs one on every request (revoking the
        last key does not open it). While the database is unreachable, the last answer holds
        (the server asks at start, so there is one)."""
        if self._any:
            return True  # keys are revoked, never deleted: once true, always
        now = time.monotonic()
        if now - self._checked > max_age_s:
            try:
                rows = await self.db.fetch("SELECT 1 FROM api_keys LIMIT 1")
            except DatabaseUnavailable:
                if self._checked < 0:
                    raise  # never known: refuse rather than guess
                return self._any  # the database is away: what was last known
            self._any, self._checked = bool(rows), now
        return self._any
