"""The operator's dashboard: `/dashboard` (a page in clients/web, no CDN: it works offline)
plots what `GET /v1/admin/dashboard` (admin key) returns, live.

A sampler reads the metrics registry every `--dashboard-sample` seconds and keeps an hour of
points. Each
point holds what changed since the one before: TTFT and inter-token latency percentiles
(interpolated within the histograms' buckets, as Prometheus' histogram_quantile does),
generated tokens per second, the mean decode batch, prompt-cache and embedding-cache hit
rates, requests and tokens per key; and what stands: KV use, queue depth, memory. Loaded
models are read at each request.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from quart import Blueprint, Quart, Response, current_app, send_from_directory

from server.core.http import json_response
from server.core.metrics import Metrics
from server.core.state import AppState, app_state
from server.ops.admin import check_admin
from server.ops.health import rss_bytes
from server.ops.web import WEB_DIR

KEEP_S = 3600.0
bp = Blueprint("dashboard", __name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read(metrics: Metrics) -> Samples:
    """Every sample in the registry, by name and labels."""
    found: Samples = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    want = set(labels.items())
    found: defaultdict[str, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name and want <= set(ls):
            found[dict(ls).get(label, "")] += v
    return dict(found)


def buckets(samples: Samples, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts, summed over its labels, by upper bound."""
    found: defaultdict[float, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name + "_bucket":
            found[float(dict(ls)["le"])] += v
    return dict(found)


def quantile(q: float, now: dict[float, float], before: dict[float, float]) -> float | None:
    """The q-quantile of the observations between two readings of a histogram, linear within
    the bucket it falls in; None without observations."""
    bounds = sorted(now)
    counts = [now[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: that bound is what is known
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def _rate(now: float, before: float, seconds: float) -> float:
    return max(0.0, now - before) / seconds if seconds > 0 else 0.0


def _ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses > 0 else None


class Timeline:
    """An hour of points, one every `every_s`."""

    def __init__(self, metrics: Metrics, every_s: float) -> None:
        self.metrics = metrics
        self.every_s = every_s
        self.points: deque[dict[str, Any]] = deque(maxlen=max(1, int(KEEP_S / every_s)))
        self._last: Samples | None = None
        self._last_at = 0.0

    def sample(self) -> None:
        now_at = time.time()
        now = read(self.metrics)
        before, self._last = self._last, now
        seconds, self._last_at = now_at - self._last_at, now_at
        if before is None:
            return
        point: dict[str, Any] = {"t": round(now_at, 3)}
        for key, name in (("ttft", "npugate_time_to_first_token_seconds"),
                          ("itl", "npugate_inter_token_latency_seconds")):
            a, b = buckets(now, name), buckets(before, name)
            for q in (50, 95):
                found = quantile(q / 100, a, b)
                point[f"{key}_p{q}_ms"] = None if found is None else round(found * 1e3, 2)
        point["tokens_per_s"] = round(_rate(total(now, "npugate_generation_tokens_total"),
                                            total(before, "npugate_generation_tokens_total"),
                                            seconds), 2)
        runs = total(now, "npugate_decode_batch_size_count") - \
            total(before, "npugate_decode_batch_size_count")
        rows = total(now, "npugate_decode_batch_size_sum") - \
            total(before, "npugate_decode_batch_size_sum")
        point["decode_batch"] = round(rows / runs, 2) if runs > 0 else None
        budget = total(now, "npugate_kv_cache_bytes", kind="budget")
        point["kv_used"] = round(total(now, "npugate_kv_cache_bytes", kind="reserved")
                                 / budget, 4) if budget else None
        point["queue"] = total(now, "npugate_num_requests_waiting") + \
            total(now, "npugate_embedding_queue_size")
        point["running"] = total(now, "npugate_num_requests_running")

        def delta(name: str, **labels: str) -> float:
            return total(now, name, **labels) - total(before, name, **labels)

        point["prompt_cache_hit_rate"] = _ratio(delta("npugate_prompt_cache_hits_total"),
                                                delta("npugate_prompt_cache_misses_total"))
        point["embedding_cache_hit_rate"] = _ratio(
            delta("npugate_embedding_cache_hits_total"),
            delta("npugate_embedding_cache_misses_total"))
        point["rss_bytes"] = rss_bytes()
        requests = by_label(now, "npugate_tenant_requests_total", "tenant")
        requests_before = by_label(before, "npugate_tenant_requests_total", "tenant")
        tokens = by_label(now, "npugate_tenant_tokens_total", "tenant", kind="generated")
        tokens_before = by_label(before, "npugate_tenant_tokens_total", "tenant",
                                 kind="generated")
        prompt = by_label(now, "npugate_tenant_tokens_total", "tenant", kind="prompt")
        prompt_before = by_label(before, "npugate_tenant_tokens_total", "tenant", kind="prompt")
        point["tenants"] = {
            name: {"requests": n - requests_before.get(name, 0.0),
                   "generated_tokens": tokens.get(name, 0.0) - tokens_before.get(name, 0.0),
                   "prompt_tokens": prompt.get(name, 0.0) - prompt_before.get(name, 0.0)}
            for name, n in requests.items()}
        self.points.append(point)

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(self.every_s)


def install(app: Quart, state: AppState) -> Timeline:
    timeline = app.extensions["npugate.dashboard"] = Timeline(
        state.metrics, state.settings.dashboard_sample_s)

    @app.while_serving
    async def sample() -> AsyncGenerator[None, None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(timeline.run)
            yield
            tg.cancel_scope.cancel()

    return timeline


@bp.get("/dashboard")
async def page() -> Response:
    return await send_from_directory(WEB_DIR, "dashboard.html")


@bp.get("/v1/admin/dashboard")
async def figures() -> Response:
    check_admin()
    state = app_state()
    timeline: Timeline = current_app.extensions["npugate.dashboard"]
    return json_response({
        "object": "dashboard", "sample_every_s": timeline.every_s, "now": time.time(),
        "uptime_s": round(time.monotonic() - state.started, 1), "status": state.status(),
        "models": [{"id": e.id, "task": e.task, "status": e.status,
                    "provider": e.provider, "memory_bytes": e.memory_bytes()}
                   for e in state.registry.entries.values()],
        "rss_bytes": rss_bytes(), "points": list(timeline.points)})
