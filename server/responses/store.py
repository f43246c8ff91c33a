"""Where stored responses live: the server's database (`server.core.database`), SQLite on
this machine by default or PostgreSQL, shared by replicas. A record holds everything needed
to continue its conversation without walking a chain of earlier records: the items the model
read (`context`), its output, and the response object as served. It belongs to the API key's
scope that created it; every read and delete names that scope, so another key's id is simply
not found. Retention is bounded by age and by size; the oldest records go first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from server.core.database import Database, DatabaseUnavailable

SCHEMA = ("""
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    body TEXT NOT NULL
)""", "CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at)")
# The oldest records whose sizes add up to at least the excess (the one parameter)
OLDEST_OVER = """DELETE FROM responses WHERE id IN (
    SELECT id FROM (SELECT id, size, SUM(size) OVER (ORDER BY created_at, id) AS running
                    FROM responses) AS r
    WHERE running - size < ?)"""
PRUNE_EVERY = 64  # writes between size checks (age is checked on every write)


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str  # the creating key's scope (server.core.security.key_scope)
    created_at: float
    response: dict[str, Any]  # the response object as served
    context: list[dict[str, Any]]  # the input items the model read, earlier turns included
    instructions: str | None = None

    def encode(self) -> str:
        return orjson.dumps({"response": self.response, "context": self.context,
                             "instructions": self.instructions}).decode()

    @classmethod
    def decode(cls, id: str, owner: str, created_at: float, body: str) -> StoredResponse:
        data = orjson.loads(body)
        return cls(id, owner, created_at, data["response"], data["context"],
                   data.get("instructions"))


@dataclass(frozen=True)
class Retention:
    max_age_s: float  # 0: no age limit
    max_bytes: int  # 0: no size limit


class ResponseStore:
    """Stored responses in the server's database (`server.core.database`)."""

    def __init__(self, db: Database, retention: Retention) -> None:
        self.db = db
        self.retention = retention
        self._writes = 0

    @property
    def kind(self) -> str:
        return self.db.kind

    async def put(self, record: StoredResponse) -> None:
        body = record.encode()
        await self.db.fetch("""INSERT INTO responses VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, size = EXCLUDED.size""",
                            record.id, record.owner, record.created_at, len(body), body)
        self._writes += 1
        if self.retention.max_age_s > 0:
            await self.db.fetch("DELETE FROM responses WHERE created_at < ?",
                                time.time() - self.retention.max_age_s)
        if self._writes % PRUNE_EVERY == 1 and self.retention.max_bytes > 0:
            total = (await self.db.fetch("SELECT COALESCE(SUM(size), 0) FROM responses"))[0][0]
            if total > self.retention.max_bytes:
                # the oldest records whose sizes add up to the excess
                await self.db.fetch(OLDEST_OVER, int(total - self.retention.max_bytes))

    async def get(self, id: str, owner: str) -> StoredResponse | None:
        rows = await self.db.fetch("SELECT created_at, body FROM responses "
                                   "WHERE id = ? AND owner = ?", id, owner)
        return StoredResponse.decode(id, owner, rows[0][0], rows[0][1]) if rows else None

    async def delete(self, id: str, owner: str) -> bool:
        rows = await self.db.fetch("DELETE FROM responses WHERE id = ? AND owner = ? "
                                   "RETURNING id", id, owner)
        return bool(rows)

    async def stats(self) -> dict[str, Any]:
        try:
            entries, size = (await self.db.fetch(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses"))[0]
        except DatabaseUnavailable as exc:
            return {"kind": self.kind, "reachable": False, "error": str(exc)}
        where = "path" if self.kind == "sqlite" else "url"
        return {"kind": self.kind, "reachable": True, "entries": entries, "bytes": int(size),
                where: self.db.where, **_limits(self.retention)}


def _limits(retention: Retention) -> dict[str, Any]:
    return {"max_age_s": retention.max_age_s, "max_bytes": retention.max_bytes}
