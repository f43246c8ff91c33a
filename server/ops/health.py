"""`GET /health`: overall status, each model's state and provider, uptime and memory."""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import time

from quart import Blueprint, Response

from server.core.errors import probe_status
from server.core.http import json_response
from server.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.core.state import app_state
from server.responses.services import responses_service

bp = Blueprint("health", __name__)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


@bp.get("/health")
async def health() -> Response:
    state = app_state()
    models = [entry.describe() for entry in state.registry.entries.values()]
    status = state.status()
    body = {"status": status, "uptime_s": round(time.monotonic() - state.started, 3),
            "tasks": len(asyncio.all_tasks()),  # leak check: returns to its idle level
            "memory": {"rss_bytes": rss_bytes(),
                       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
            "models": models,
            "embedding_cache": {"enabled": state.embedding_cache.enabled,
                                "max_bytes": state.embedding_cache.max_bytes,
                                **dataclasses.asdict(state.embedding_cache.stats)},
            "response_store": await responses_service().store.stats()}
    return json_response(body, probe_status(status in ("ready", "degraded")))


@bp.get("/health/live")
async def live() -> Response:
    """Liveness: the process serves HTTP (restart it if this fails)."""
    return json_response({"status": "alive"})


@bp.get("/health/ready")
async def ready() -> Response:
    """Readiness: at least one model serves and none is still loading."""
    status = app_state().status()
    return json_response({"status": status}, probe_status(status in ("ready", "degraded")))


@bp.get("/metrics")
async def metrics() -> Response:
    """Prometheus exposition of every npugate metric."""
    return Response(app_state().metrics.render(), content_type=METRICS_CONTENT_TYPE)
