"""Usage by tenant and UTC day, kept in the database (`GET /v1/admin/usage`, and the token
quotas' counts). Counts gather in memory and are written once a second, one row per tenant
and day; a quota check reads the database's count plus what is not written yet, so replicas
sharing PostgreSQL share quotas (a second's lag at most, per replica)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

from server.core.database import Database, DatabaseUnavailable

SCHEMA = ("""
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    generated_tokens BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    rate_limited BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant)
)""",)
FLUSH_EVERY_S = 1.0
log = logging.getLogger(__name__)


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0  # cached included
    cached_tokens: int = 0
    generated_tokens: int = 0
    errors: int = 0  # 5xx, and 4xx other than 429
    rate_limited: int = 0  # 429s

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def of_request(cls, status: int) -> Counts:
        """One request with its outcome."""
        return cls(requests=1, errors=int(status >= 400 and status != 429),
                   rate_limited=int(status == 429))

    @property
    def tokens(self) -> int:
        """What quotas count: every prompt token (cached ones too) and every generated one."""
        return self.prompt_tokens + self.generated_tokens


COUNTS = tuple(f.name for f in fields(Counts))


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


class UsageBook:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: defaultdict[tuple[str, str], Counts] = defaultdict(Counts)

    def add(self, tenant: str, counts: Counts) -> None:
        self._pending[(utc_day(), tenant)].add(counts)

    async def flush(self) -> None:
        """Write what gathered since the last flush (kept for the next one if that fails)."""
        pending, self._pending = self._pending, defaultdict(Counts)
        sets = ", ".join(f"{c} = usage_daily.{c} + EXCLUDED.{c}" for c in COUNTS)
        for i, ((day, tenant), counts) in enumerate(list(pending.items())):
            try:
                await self.db.fetch(
                    f"INSERT INTO usage_daily (day, tenant, {', '.join(COUNTS)}) "
                    f"VALUES (?, ?, {', '.join('?' * len(COUNTS))}) "
                    f"ON CONFLICT (day, tenant) DO UPDATE SET {sets}",
                    day, tenant, *(getattr(counts, c) for c in COUNTS))
            except DatabaseUnavailable as exc:
                log.warning("usage not written yet: %s", exc)
                for key, rest in list(pending.items())[i:]:
                    self._pending[key].add(rest)
                return

    async def tokens_since(self, tenant: str, first_day: str) -> int:
        """Tokens `tenant` used from `first_day` on, unwritten ones included."""
        rows = await self.db.fetch(
            "SELECT COALESCE(SUM(prompt_tokens + generated_tokens), 0) FROM usage_daily "
            "WHERE tenant = ? AND day >= ?", tenant, first_day)
        unwritten = sum(c.tokens for (day, t), c in self._pending.items()
                        if t == tenant and day >= first_day)
        return int(rows[0][0]) + unwritten

    async def by_day(self, first_day: str, last_day: str, tenant: str | None = None
                     ) -> list[dict[str, Any]]:
        """Rows of totals by day and tenant, oldest first (written ones: flush first)."""
        where = "day >= ? AND day <= ?" + ("" if tenant is None else " AND tenant = ?")
        args = (first_day, last_day) if tenant is None else (first_day, last_day, tenant)
        rows = await self.db.fetch(f"SELECT day, tenant, {', '.join(COUNTS)} FROM usage_daily "
                                   f"WHERE {where} ORDER BY day, tenant", *args)
        return [{"day": row[0], "tenant": row[1],
                 **{c: int(v) for c, v in zip(COUNTS, row[2:], strict=True)}} for row in rows]
