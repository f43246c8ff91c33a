"""The server's one database: stored responses, API keys and usage by day live in it.

SQLite on this machine by default (a file in the data directory), or PostgreSQL, which
replicas share (`--response-store postgresql://...`). Statements are written once, with `?`
placeholders, in the SQL both understand (UPSERT, RETURNING, window functions); PostgreSQL
gets them numbered.

SQLite runs on one worker thread (`anyio.to_thread`), never on the event loop, in WAL mode: a
killed process leaves the last committed state. PostgreSQL goes through asyncpg's pool.
Any failure to reach or use the database is `DatabaseUnavailable` (a 503 to clients).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio

SQLITE_FILE = "npugate.sqlite3"
_PLACEHOLDER = re.compile(r"\?")


class DatabaseUnavailable(Exception):
    """The database cannot be reached or failed (a 503 to the client)."""


class Database(Protocol):
    kind: str  # "sqlite" or "postgresql"
    where: str  # its path, or its URL without the password

    async def open(self, schema: Sequence[str]) -> None:
        """Connect and create what `schema`'s statements create (each IF NOT EXISTS)."""
    async def close(self) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]: ...


class SQLiteDatabase:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection

    async def open(self, schema: Sequence[str]) -> None:
        await anyio.to_thread.run_sync(self._open, schema)

    def _open(self, schema: Sequence[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed process
            db.execute("PRAGMA busy_timeout=5000")
            for statement in schema:
                db.execute(statement)
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open the database (--data-dir) at {self.path}: "
                                      f"{exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close)

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await anyio.to_thread.run_sync(self._run, sql, args)

    def _run(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._db is None:
            raise DatabaseUnavailable("the database is closed")
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise DatabaseUnavailable(f"the database failed: {exc}") from exc


class PostgresDatabase:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = redact(url)
        self._pool: Any = None

    async def open(self, schema: Sequence[str]) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4,
                                                   command_timeout=10)
            async with self._pool.acquire() as conn:
                # replicas starting together would race to create the tables
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(7021548)")
                    for statement in schema:
                        await conn.execute(statement)
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"cannot open the database (--response-store) at "
                                      f"{self.where}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import asyncpg

        if self._pool is None:
            raise DatabaseUnavailable("the database is closed")
        numbered = iter(range(1, len(args) + 1))
        sql = _PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql)
        try:
            return [tuple(row) for row in await self._pool.fetch(sql, *args)]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseUnavailable(f"the database failed: {exc}") from exc


def redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url


def open_database(url: str, data_dir: Path) -> Database:
    """The database a `--response-store` value names: empty or "sqlite" (a file in
    `data_dir`), "sqlite:///PATH", or "postgresql://..."."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(Path(url[len("sqlite:///"):]).expanduser())
    if url in ("", "sqlite"):
        return SQLiteDatabase(data_dir / SQLITE_FILE)
    raise ValueError(f"unknown database {url!r}: use sqlite, sqlite:///PATH or "
                     "postgresql://USER@HOST/DB")
