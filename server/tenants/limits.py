"""Each tenant's limits, checked before its work starts (`Gate`), with OpenAI's headers.

- Requests and tokens per minute are token buckets, in this process's memory: with several
  replicas each one allows the full rate (docs/tenants.md says so). A bucket holds a minute's
  allowance and refills continuously. A request is admitted while the request bucket has one
  left; tokens are charged when the work ends, as they were really used, so a request is
  admitted while the token bucket is above zero and a large answer may take it below.
- Token quotas per UTC day and month count in the database (`server.tenants.usage`), so
  replicas sharing PostgreSQL share them. A generation already running is never cut off by
  its own tenant's quota: the next request is refused.
- Concurrent generations are counted per replica.

Over a limit the answer is 429 with `Retry-After` (and `retry-after-ms`) set to when the
limit allows the request, and `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from server.core.errors import APIError, rate_limited
from server.core.tenant import Tenant
from server.tenants.usage import Counts, UsageBook, utc_day

DAY_S = 86400.0


@dataclass
class Bucket:
    capacity: float  # a minute's allowance
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, need: float = 1.0) -> float:
        """Seconds until the bucket holds `need`."""
        return max(0.0, (need - self.level) / self.rate)

    def headers(self, kind: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for this bucket (`kind`: requests or tokens)."""
        return {f"x-ratelimit-limit-{kind}": str(int(self.capacity)),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
                f"x-ratelimit-reset-{kind}": duration(self.wait_s(self.capacity))}


def duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it: 20ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    return (f"{hours}h" if hours else "") + f"{rest // 60}m{rest % 60}s"


@dataclass
class Lease:
    """One admitted generation: ends with `finish`, which charges what it used."""

    gate: Gate
    tenant: Tenant
    done: bool = False

    def finish(self, prompt_tokens: int = 0, cached_tokens: int = 0,
               generated_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self.gate.finish(self.tenant, Counts(prompt_tokens=prompt_tokens,
                                             cached_tokens=cached_tokens,
                                             generated_tokens=generated_tokens))


@dataclass
class Gate:
    usage: UsageBook | None = None  # None: no quotas and no books (a bare service in tests)
    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, Bucket] = field(default_factory=dict)
    _tokens: dict[str, Bucket] = field(default_factory=dict)
    running: Counter[str] = field(default_factory=Counter)

    def _bucket(self, store: dict[str, Bucket], tenant: Tenant, capacity: int) -> Bucket:
        now = self.clock()
        bucket = store.get(tenant.name)
        if bucket is None or bucket.capacity != capacity:
            bucket = store[tenant.name] = Bucket(float(capacity), float(capacity), now)
        bucket.refill(now)
        return bucket

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """The x-ratelimit-* headers of `tenant`'s limits as they stand."""
        found: dict[str, str] = {}
        if tenant.limits.requests_per_minute:
            found |= self._bucket(self._requests, tenant,
                                  tenant.limits.requests_per_minute).headers("requests")
        if tenant.limits.tokens_per_minute:
            found |= self._bucket(self._tokens, tenant,
                                  tenant.limits.tokens_per_minute).headers("tokens")
        return found

    def check_request(self, tenant: Tenant) -> None:
        """Take one request from `tenant`'s per-minute allowance (429 if none is left)."""
        rpm = tenant.limits.requests_per_minute
        if not rpm:
            return
        bucket = self._bucket(self._requests, tenant, rpm)
        if bucket.level < 1:
            wait = bucket.wait_s()
            raise rate_limited(f"Rate limit reached for requests: {rpm} per minute for key "
                               f"{tenant.name!r}. Please try again in {duration(wait)}.",
                               wait, self.headers(tenant))
        bucket.level -= 1

    async def begin(self, tenant: Tenant) -> Lease:
        """Admit one generation of `tenant`, or raise 429: over its tokens per minute, its
        concurrent generations, or its day's or month's token quota."""
        limits = tenant.limits
        if limits.tokens_per_minute:
            bucket = self._bucket(self._tokens, tenant, limits.tokens_per_minute)
            if bucket.level < 1:
                wait = bucket.wait_s()
                raise rate_limited(
                    f"Rate limit reached for tokens: {limits.tokens_per_minute} per minute "
                    f"for key {tenant.name!r}. Please try again in {duration(wait)}.",
                    wait, self.headers(tenant))
        if limits.max_concurrent and self.running[tenant.name] >= limits.max_concurrent:
            raise rate_limited(
                f"Key {tenant.name!r} has {limits.max_concurrent} generations running, its "
                "limit; retry when one finishes", 1.0, self.headers(tenant),
                code="concurrency_limit_exceeded")
        await self._check_quotas(tenant)
        self.running[tenant.name] += 1
        return Lease(self, tenant)

    async def _check_quotas(self, tenant: Tenant) -> None:
        limits = tenant.limits
        now = time.time()
        today = utc_day(now)
        for quota, first, period, ends in (
                (limits.tokens_per_day, today, "day", _next_day(now)),
                (limits.tokens_per_month, today[:8] + "01", "month", _next_month(now))):
            if quota and self.usage is not None \
                    and await self.usage.tokens_since(tenant.name, first) >= quota:
                raise _quota_spent(tenant, quota, period, ends - now, self.headers(tenant))

    def finish(self, tenant: Tenant, counts: Counts) -> None:
        self.running[tenant.name] -= 1
        if self.running[tenant.name] <= 0:
            del self.running[tenant.name]
        if tenant.limits.tokens_per_minute:
            self._bucket(self._tokens, tenant,
                         tenant.limits.tokens_per_minute).level -= counts.tokens
        if self.usage is not None:
            self.usage.add(tenant.name, counts)

    @asynccontextmanager
    async def admitted(self, tenant: Tenant) -> AsyncIterator[Lease]:
        """`begin`, for a block that starts the work: if the block fails, the lease ends with
        nothing used; else its owner finishes it when the work ends."""
        lease = await self.begin(tenant)
        try:
            yield lease
        except BaseException:
            lease.finish()
            raise


def _quota_spent(tenant: Tenant, quota: int, period: str, wait_s: float,
                 headers: dict[str, str]) -> APIError:
    return rate_limited(f"Key {tenant.name!r} has used its {quota} tokens for this {period} "
                        f"(UTC); it resets in {duration(wait_s)}", wait_s, headers,
                        code="insufficient_quota", retry=False)


def _next_day(now: float) -> float:
    return (math.floor(now / DAY_S) + 1) * DAY_S


def _next_month(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
