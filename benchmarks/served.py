"""`npugate serve` in its own process for the duration of a benchmark."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(*args: str, ready_s: float = 120, tree: Path = REPO) -> Iterator[str]:
    """Run `npugate serve ARGS` on a free loopback port; yield its base URL once /health is
    200, and stop it on exit. `tree`: the checkout whose server runs (another commit's, for a
    baseline measured in the same run)."""
    with served_process(*args, ready_s=ready_s, tree=tree) as (base, _):
        yield base


@contextmanager
def served_process(*args: str, ready_s: float = 120, tree: Path = REPO
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`served`, yielding the server's process too (to read its memory)."""
    with launched(lambda port: [sys.executable, "-m", "server", "--port", str(port),
                                "--log-level", "warning", *args],
                  ready_s=ready_s, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}
                  ) as started:
        yield started


@contextmanager
def launched(argv: Callable[[int], list[str]], *, ready_s: float = 120, cwd: Path | None = None,
             env: dict[str, str] | None = None, quiet: bool = False
             ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Any HTTP server on a free loopback port (`argv(port)` starts it): yield its base URL and
    process once `GET /health` answers 200, and stop it on exit (killed if it lingers)."""
    port = free_port()
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(argv(port), cwd=cwd, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv(port)[0]} exited with {proc.returncode}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv(port)[0]} did not become ready")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stream_chat(url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                client: httpx.Client | None = None) -> dict[str, Any]:
    """One greedy SSE chat (on `client`'s pooled connection if given, else a new one): its
    status, time to first content, decode tokens/s, tokens, when it ended (seconds from the
    request), and when each content chunk arrived (`arrivals`, perf_counter seconds). Tokens
    that complete no character arrive with the next chunk, so decode speed is the tokens after
    the first over the span from first to last content chunk."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    arrivals: list[float] = []
    with (client.stream("POST", url, json=body) if client is not None else
          httpx.stream("POST", url, json=body, timeout=600)) as resp:
        status = resp.status_code
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                arrivals.append(last)
    return {"status": status, "ttft_s": first - t0, "tokens": tokens,
            "tok_s": (tokens - 1) / max(last - first, 1e-9), "end_s": time.perf_counter() - t0,
            "arrivals": arrivals}


def gaps(arrivals: list[float], start: float = 0.0, end: float = float("inf")) -> list[float]:
    """Seconds between consecutive content chunks that arrived within [start, end]."""
    times = [t for t in arrivals if start <= t <= end]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def level_stats(ttfts: list[float], tokens: int, wall_s: float) -> dict[str, float]:
    """What one concurrency level delivered: aggregate tokens/s and TTFT p50 and max."""
    return {"aggregate_tok_s": tokens / wall_s, "ttft_s_p50": statistics.median(ttfts),
            "ttft_s_max": max(ttfts)}


LEVEL_HEADER = f"{'aggregate tok/s':>16} {'TTFT p50 ms':>12} {'TTFT max ms':>12}"


def level_cells(stats: dict[str, float]) -> str:
    """`level_stats` as table cells under LEVEL_HEADER."""
    return (f"{stats['aggregate_tok_s']:>16.1f} {stats['ttft_s_p50'] * 1e3:>12.0f} "
            f"{stats['ttft_s_max'] * 1e3:>12.0f}")
