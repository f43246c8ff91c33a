"""Where stored responses live: SQLite on this machine (the default) or PostgreSQL, shared by
replicas. A record holds everything needed to continue its conversation without walking a
chain of earlier records: the items the model read (`context`), its output, and the response
object as served. It belongs to the API key's scope that created it; every read and delete
names that scope, so another key's id is simply not found.

SQLite runs on one worker thread (`anyio.to_thread`), never on the event loop, in WAL mode:
a killed process leaves the last committed state. Retention is bounded by age and by size;
the oldest records go first.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    body TEXT NOT NULL
)"""
INDEX = "CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at)"
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


class StoreUnavailable(Exception):
    """The store cannot be reached (a 503 to the client)."""


class ResponseStore(Protocol):
    kind: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def put(self, record: StoredResponse) -> None: ...
    async def get(self, id: str, owner: str) -> StoredResponse | None: ...
    async def delete(self, id: str, owner: str) -> bool: ...
    async def stats(self) -> dict[str, Any]: ...


class SQLiteStore:
    """One file in the data directory."""

    kind = "sqlite"

    def __init__(self, path: Path, retention: Retention) -> None:
        self.path = path
        self.retention = retention
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection
        self._writes = 0

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed process
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(SCHEMA)
        db.execute(INDEX)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close)

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if self._db is None:
            raise StoreUnavailable("the response store is closed")
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the response store failed: {exc}") from exc

    async def put(self, record: StoredResponse) -> None:
        body = record.encode()
        await anyio.to_thread.run_sync(self._put, record, body)

    def _put(self, record: StoredResponse, body: str) -> None:
        self._run("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                  (record.id, record.owner, record.created_at, len(body), body))
        self._writes += 1
        self._prune(check_size=self._writes % PRUNE_EVERY == 1)

    def _prune(self, check_size: bool) -> None:
        if self.retention.max_age_s > 0:
            self._run("DELETE FROM responses WHERE created_at < ?",
                      (time.time() - self.retention.max_age_s,))
        if check_size and self.retention.max_bytes > 0:
            total = self._run("SELECT COALESCE(SUM(size), 0) FROM responses")[0][0]
            excess = total - self.retention.max_bytes
            if excess > 0:
                # the oldest records whose sizes add up to the excess
                self._run(OLDEST_OVER, (excess,))

    async def get(self, id: str, owner: str) -> StoredResponse | None:
        rows = await anyio.to_thread.run_sync(
            self._run, "SELECT created_at, body FROM responses WHERE id = ? AND owner = ?",
            (id, owner))
        return StoredResponse.decode(id, owner, rows[0][0], rows[0][1]) if rows else None

    async def delete(self, id: str, owner: str) -> bool:
        rows = await anyio.to_thread.run_sync(
            self._run, "DELETE FROM responses WHERE id = ? AND owner = ? RETURNING id",
            (id, owner))
        return bool(rows)

    async def stats(self) -> dict[str, Any]:
        try:
            entries, size = (await anyio.to_thread.run_sync(
                self._run, "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses"))[0]
        except StoreUnavailable as exc:
            return {"kind": self.kind, "reachable": False, "error": str(exc)}
        return {"kind": self.kind, "reachable": True, "entries": entries, "bytes": size,
                "path": str(self.path), **_limits(self.retention)}


class PostgresStore:
    """A PostgreSQL database that replicas share (asyncpg's pool)."""

    kind = "postgresql"

    def __init__(self, url: str, retention: Retention) -> None:
        self.url = url
        self.retention = retention
        self._pool: Any = None
        self._writes = 0

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4,
                                                   command_timeout=10)
            async with self._pool.acquire() as conn:
                # replicas starting together would race to create the table
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(7021548)")
                    await conn.execute(SCHEMA)
                    await conn.execute(INDEX)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot open the response store at {_redact(self.url)}: "
                                   f"{exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        import asyncpg

        if self._pool is None:
            raise StoreUnavailable("the response store is closed")
        try:
            return await getattr(self._pool, method)(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the response store failed: {exc}") from exc

    async def put(self, record: StoredResponse) -> None:
        body = record.encode()
        await self._call("execute", """INSERT INTO responses VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, size = EXCLUDED.size""",
                         record.id, record.owner, record.created_at, len(body), body)
        self._writes += 1
        if self.retention.max_age_s > 0:
            await self._call("execute", "DELETE FROM responses WHERE created_at < $1",
                             time.time() - self.retention.max_age_s)
        if self._writes % PRUNE_EVERY == 1 and self.retention.max_bytes > 0:
            total = await self._call("fetchval",
                                     "SELECT COALESCE(SUM(size), 0) FROM responses")
            if total > self.retention.max_bytes:
                await self._call("execute", OLDEST_OVER.replace("?", "$1"),
                                 int(total - self.retention.max_bytes))

    async def get(self, id: str, owner: str) -> StoredResponse | None:
        row = await self._call("fetchrow", "SELECT created_at, body FROM responses "
                               "WHERE id = $1 AND owner = $2", id, owner)
        return None if row is None else StoredResponse.decode(id, owner, row[0], row[1])

    async def delete(self, id: str, owner: str) -> bool:
        row = await self._call("fetchrow", "DELETE FROM responses WHERE id = $1 AND owner = $2 "
                               "RETURNING id", id, owner)
        return row is not None

    async def stats(self) -> dict[str, Any]:
        try:
            row = await self._call("fetchrow",
                                   "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses")
        except StoreUnavailable as exc:
            return {"kind": self.kind, "reachable": False, "error": str(exc)}
        return {"kind": self.kind, "reachable": True, "entries": row[0], "bytes": int(row[1]),
                "url": _redact(self.url), **_limits(self.retention)}


def _limits(retention: Retention) -> dict[str, Any]:
    return {"max_age_s": retention.max_age_s, "max_bytes": retention.max_bytes}


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url


def open_store(url: str, data_dir: Path, retention: Retention) -> ResponseStore:
    """The store a `--response-store` value names: empty or "sqlite" (a file in `data_dir`),
    "sqlite:///PATH", or "postgresql://..."."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, retention)
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite:///"):]).expanduser(), retention)
    if url in ("", "sqlite"):
        return SQLiteStore(data_dir / "responses.sqlite3", retention)
    raise ValueError(f"unknown response store {url!r}: use sqlite, sqlite:///PATH or "
                     "postgresql://USER@HOST/DB")
