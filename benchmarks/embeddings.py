"""Embeddings benchmark: npugate against raw onnxruntime and the bare HTTP stack, in one run.

Measured on the same model (all-MiniLM-L6-v2 by default), single-text requests of 6-20 words:
  raw        EmbeddingModel in-process (tokenize + onnxruntime + pooling) at every batch size
             in BATCH_SIZES, length-sorted; its best throughput and its single-text p50
  stack      a bare Quart app on Hypercorn answering a fixed embeddings body: the stack's own
             ceiling, at concurrency 1 and 32
  serial     1 / (1/stack + 1/raw best): the bound if HTTP work and compute never overlapped
  npugate    `npugate serve` with the cache off at concurrency 1, 8, 32 and 64, with its mean
             batch size per level from /metrics, and why (queue depth at each cut, padding
             refusals per run)
  cache      npugate at concurrency 32 with the cache on, at 0%, 50% and 90% hit rates
Every HTTP figure comes from the same load generator: wrk (Debian's `wrk`, in C) when it is
installed, else a Python httpx client (whose own CPU use caps what 2 cores can measure).
Each server runs alone. Results go to benchmarks/results/embeddings.json.
Targets (issue 12): at c=32 mean batch >= 16 and >= 0.9x the serial bound; at c=1 p50 <= raw
single p50 + the stack's c=1 p50 + 1 ms; at a 90% hit rate, c=32 >= 2x the cache-off figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import free_port, served  # noqa: E402
from inference.embed.model import EmbeddingModel  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)
BATCH_SIZES = (1, 4, 8, 16, 32, 64)
HIT_RATES = (0.0, 0.5, 0.9)
WORDS = ("the quick brown fox jumps over a lazy dog while markets rally and rain falls on "
         "quiet harbours where engineers measure latency throughput memory and power").split()
BARE_APP = '''
import orjson
from quart import Quart, Response, request

app = Quart("bare")
BODY = orjson.dumps({"object": "list", "model": "m", "data": [{"object": "embedding",
    "index": 0, "embedding": [0.01] * DIM}], "usage": {"prompt_tokens": 12,
    "total_tokens": 12}})


@app.post("/v1/embeddings")
async def embeddings():
    await request.get_data()
    return Response(BODY, content_type="application/json")


@app.get("/health")
async def health():
    return {"status": "ok"}
'''


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 6 to 20 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 21)))) for _ in range(n)]


def raw_baseline(model: EmbeddingModel, texts: list[str]) -> dict[str, Any]:
    texts = sorted(texts, key=len)  # raw at its best: batches of similar lengths
    out: dict[str, float] = {}
    for bs in BATCH_SIZES:
        model.embed_batch(model.tokenize(texts[:bs]))  # warm-up at this shape
        start = time.perf_counter()
        for i in range(0, len(texts), bs):
            model.embed_batch(model.tokenize(texts[i: i + bs]))
        out[str(bs)] = len(texts) / (time.perf_counter() - start)
    single = []
    for text in texts[::2][:200]:
        t0 = time.perf_counter()
        model.embed_batch(model.tokenize([text]))
        single.append((time.perf_counter() - t0) * 1e3)
    best = max(out, key=lambda k: out[k])
    return {"throughput_by_batch": out, "best_batch": int(best),
            "best_throughput": out[best], "single_p50_ms": statistics.median(single)}


WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"},
                    bodies[((counter - 1) % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.6f %.3f %.3f %.3f %d %d\\n", summary.requests,
    summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, summary.errors.status, summary.errors.connect))
end
"""


class Load:
    """The one load generator: wrk, or a Python httpx client."""

    def __init__(self, use_wrk: bool, seconds: int, workdir: Path) -> None:
        self.use_wrk = use_wrk
        self.seconds = seconds
        self.workdir = workdir

    @property
    def name(self) -> str:
        return "wrk" if self.use_wrk else "python-httpx"

    def run(self, base: str, model: str, texts: list[str], concurrency: int
            ) -> dict[str, float]:
        if self.use_wrk:
            return self._wrk(base, model, texts, concurrency)
        return anyio.run(self._httpx, base, model, texts, concurrency)

    def _wrk(self, base: str, model: str, texts: list[str], c: int) -> dict[str, float]:
        script = self.workdir / "embeddings.lua"
        bodies = ",\n".join(json.dumps(json.dumps({"model": model, "input": t})) for t in texts)
        script.write_text(f"bodies = {{\n{bodies}\n}}\n{WRK_SCRIPT}")
        proc = subprocess.run(["wrk", "-t1", f"-c{c}", f"-d{self.seconds}s", "-s", str(script),
                               base], capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        n, dur, p50, p95, p99, status_err, conn_err = line.split()[1:]
        if int(status_err) or int(conn_err):
            raise RuntimeError(f"wrk saw {status_err} HTTP errors and {conn_err} connect errors")
        return {"requests": int(n), "throughput_rps": int(n) / float(dur),
                "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}

    async def _httpx(self, base: str, model: str, texts: list[str], c: int
                     ) -> dict[str, float]:
        latencies: list[float] = []
        deadline = time.perf_counter() + self.seconds
        position = 0
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            async def worker() -> None:
                nonlocal position
                while time.perf_counter() < deadline:
                    text = texts[position % len(texts)]
                    position += 1
                    t0 = time.perf_counter()
                    resp = await client.post("/v1/embeddings", json={"model": model,
                                                                     "input": text})
                    resp.raise_for_status()
                    latencies.append((time.perf_counter() - t0) * 1e3)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(c):
                    tg.start_soon(worker)
            elapsed = time.perf_counter() - start
        return {"requests": len(latencies), "throughput_rps": len(latencies) / elapsed,
                "p50_ms": float(np.percentile(latencies, 50)),
                "p95_ms": float(np.percentile(latencies, 95)),
                "p99_ms": float(np.percentile(latencies, 99))}


def bare_stack(load: Load, texts: list[str], dim: int) -> dict[str, Any]:
    app_dir = load.workdir / "bare"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "bare_app.py").write_text(BARE_APP.replace("DIM", str(dim)))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}",
                             "--log-level", "warning", "bare_app:app"], cwd=app_dir)
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        out = {}
        for c in (1, 32):
            load.run(base, "m", texts[:64], c)  # warm-up
            out[str(c)] = load.run(base, "m", texts, c)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _snapshot(base: str) -> dict[str, float]:
    health = httpx.get(base + "/health").json()
    stats = health["models"][0]["stats"]
    metrics = httpx.get(base + "/metrics").text
    return {"batch_sum": _metric(metrics, "npugate_embedding_batch_size_sum"),
            "batch_count": _metric(metrics, "npugate_embedding_batch_size_count"),
            "queue_depth": stats["queue_depth_total"],
            "refusals": stats["padding_refusals_total"],
            "hits": health["embedding_cache"]["hits"],
            "misses": health["embedding_cache"]["misses"]}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    runs = max(d["batch_count"], 1)
    lookups = max(d["hits"] + d["misses"], 1)
    return {"mean_batch": d["batch_sum"] / runs, "mean_queue_depth": d["queue_depth"] / runs,
            "padding_refusals_per_run": d["refusals"] / runs, "model_runs": d["batch_count"],
            "hit_rate": d["hits"] / lookups}


def npugate_levels(model_dir: Path, load: Load, texts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with served("--embedding-model", str(model_dir), "--embedding-device", "cpu",
                "--embedding-cache", "0") as base:
        model_id = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        for c in CONCURRENCY:
            load.run(base, model_id, texts[:64], c)  # warm-up
            before = _snapshot(base)
            result = load.run(base, model_id, texts, c)
            out[str(c)] = {**result, **_delta(_snapshot(base), before)}
    return out


def cache_levels(model_dir: Path, load: Load, seed: int) -> dict[str, Any]:
    """c=32 with the cache on: each body list holds hot texts (answered once before the
    run) at the given rate, and texts seen nowhere else for the rest."""
    out: dict[str, Any] = {}
    hot = make_texts(64, seed=seed)
    with served("--embedding-model", str(model_dir), "--embedding-device", "cpu",
                "--embedding-cache", "64") as base:
        model_id = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        for text in hot:
            httpx.post(base + "/v1/embeddings", json={"model": model_id, "input": text})
        for n, rate in enumerate(HIT_RATES):
            fresh = iter(make_texts(20000, seed=seed + 1 + n))
            every = round(1 / (1 - rate)) if rate < 1 else 0  # one fresh text in `every`
            bodies = [next(fresh) if every and i % every == 0 else hot[i % len(hot)]
                      for i in range(20000)]
            before = _snapshot(base)
            result = load.run(base, model_id, bodies, 32)
            out[f"{int(rate * 100)}%"] = {**result, **_delta(_snapshot(base), before)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_models_dir() / "all-minilm-l6-v2")
    ap.add_argument("--seconds", type=int, default=5, help="seconds per level")
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/embeddings.json")
    args = ap.parse_args()
    texts = make_texts(20000)
    model = EmbeddingModel.load(args.model, device="cpu")
    raw = raw_baseline(model, texts[:512])
    dim = model.spec.dimension
    del model
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk") is not None)
    with tempfile.TemporaryDirectory() as tmp:
        load = Load(use_wrk, args.seconds, Path(tmp))
        stack = bare_stack(load, texts, dim)
        levels = npugate_levels(args.model, load, texts)
        cache = cache_levels(args.model, load, seed=7)
    serial = 1 / (1 / stack["32"]["throughput_rps"] + 1 / raw["best_throughput"])
    c32, c1 = levels["32"], levels["1"]
    c1_bound = raw["single_p50_ms"] + stack["1"]["p50_ms"] + 1.0
    verdict = {
        "serial_bound_rps": serial,
        "c32_vs_serial_bound": c32["throughput_rps"] / serial,
        "c32_mean_batch": c32["mean_batch"],
        "c1_p50_ms": c1["p50_ms"], "c1_p50_bound_ms": c1_bound,
        "cache_90_vs_off": cache["90%"]["throughput_rps"] / c32["throughput_rps"],
    }
    verdict["c32_batch_target_met"] = verdict["c32_mean_batch"] >= 16
    verdict["c32_serial_target_met"] = verdict["c32_vs_serial_bound"] >= 0.9
    verdict["c1_latency_target_met"] = c1["p50_ms"] <= c1_bound
    verdict["cache_target_met"] = verdict["cache_90_vs_off"] >= 2.0
    report = {"benchmark": "embeddings", "model": str(args.model), "texts": "6-20 words",
              "load_generator": load.name,
              "machine": {"cpus": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "python": platform.python_version()},
              "raw": raw, "stack": stack, "npugate": levels, "cache": cache,
              "verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"load generator: {load.name}")
    print(f"raw onnxruntime: best {raw['best_throughput']:.0f} texts/s at batch "
          f"{raw['best_batch']}; single-text p50 {raw['single_p50_ms']:.2f} ms")
    print(f"bare Quart/Hypercorn stack: c=32 {stack['32']['throughput_rps']:.0f} req/s; "
          f"c=1 p50 {stack['1']['p50_ms']:.2f} ms")
    print(f"serial bound: {serial:.0f} req/s")
    print(f"{'c':>3} | {'req/s':>6} {'p50':>7} {'p95':>7} {'p99':>7} | {'batch':>5} "
          f"{'queued':>6} {'refused/run':>11}")
    for c in CONCURRENCY:
        r = levels[str(c)]
        print(f"{c:>3} | {r['throughput_rps']:>6.0f} {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} "
              f"{r['p99_ms']:>7.1f} | {r['mean_batch']:>5.1f} {r['mean_queue_depth']:>6.1f} "
              f"{r['padding_refusals_per_run']:>11.2f}")
    for name, r in cache.items():
        print(f"cache, {name} hits asked ({r['hit_rate']:.0%} measured): c=32 "
              f"{r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms")
    print(f"c=32 mean batch {c32['mean_batch']:.1f} (target >= 16: "
          f"{met(verdict['c32_batch_target_met'])})")
    print(f"c=32 vs serial bound: {verdict['c32_vs_serial_bound']:.2f}x (target >= 0.9: "
          f"{met(verdict['c32_serial_target_met'])})")
    print(f"c=1 p50 {c1['p50_ms']:.2f} ms vs bound {c1_bound:.2f} ms (raw single + stack + "
          f"1 ms: {met(verdict['c1_latency_target_met'])})")
    print(f"cache at 90% hits vs cache off, c=32: {verdict['cache_90_vs_off']:.2f}x "
          f"(target >= 2: {met(verdict['cache_target_met'])})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
