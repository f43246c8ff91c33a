"""Embeddings benchmark: throughput and latency over HTTP vs raw onnxruntime and batching off.

Measured in one run on the same model (all-MiniLM-L6-v2 by default):
  raw          EmbeddingModel in-process (tokenize + onnxruntime + pooling), every batch size
               in BATCH_SIZES; its best throughput and its single-input latency are baselines
  batched      `npugate serve`, single-text requests at concurrency 1, 8, 32, 64
  unbatched    the same server with --embedding-max-batch 1 (batching off)
The two servers run one after the other, never at once. The load generator is wrk (Debian's
`wrk`, written in C) when it is installed, else a Python httpx client; on a 2-core machine the
Python client's own CPU use caps what it can measure, so wrk is preferred. Results, with a
digest of the vectors for drift detection, go to benchmarks/results/embeddings.json.
Targets (issue 3): at concurrency 32 >= 0.8x raw best and >= 3x unbatched; at concurrency 1,
p50 <= raw single-input p50 + 3 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
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

from benchmarks.served import served  # noqa: E402
from inference.embed.model import EmbeddingModel  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)
BATCH_SIZES = (1, 4, 8, 16, 32, 64)
WORDS = ("the quick brown fox jumps over a lazy dog while markets rally and rain falls on "
         "quiet harbours where engineers measure latency throughput memory and power").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 5 to 40 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 41)))) for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def raw_baseline(model: EmbeddingModel, texts: list[str]) -> dict[str, Any]:
    # Raw at its best: batches of similar lengths (sorted), as a careful caller would make.
    texts = sorted(texts, key=len)
    out: dict[str, Any] = {}
    for bs in BATCH_SIZES:
        model.embed_batch(model.tokenize(texts[:bs]))  # warm-up at this shape
        start = time.perf_counter()
        for i in range(0, len(texts), bs):
            model.embed_batch(model.tokenize(texts[i : i + bs]))
        out[str(bs)] = len(texts) / (time.perf_counter() - start)
    single = []
    for text in texts[:200]:
        t0 = time.perf_counter()
        model.embed_batch(model.tokenize([text]))
        single.append((time.perf_counter() - t0) * 1e3)
    best = max(out, key=lambda k: out[k])
    return {"throughput_by_batch": out, "best_batch": int(best), "best_throughput": out[best],
            "single_p50_ms": statistics.median(single)}


async def load(url: str, model_id: str, texts: list[str], concurrency: int
               ) -> dict[str, float]:
    latencies: list[float] = []
    queue = list(reversed(texts))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            while queue:
                text = queue.pop()
                t0 = time.perf_counter()
                resp = await client.post(url, json={"model": model_id, "input": text})
                resp.raise_for_status()
                latencies.append((time.perf_counter() - t0) * 1e3)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "throughput_rps": len(latencies) / elapsed,
            "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95),
            "p99_ms": _pct(latencies, 99)}


WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"},
                    bodies[(counter % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.6f %.3f %.3f %.3f %d %d\\n", summary.requests,
    summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, summary.errors.status, summary.errors.connect))
end
"""


def wrk_load(base: str, model_id: str, texts: list[str], concurrency: int, seconds: int,
             workdir: Path) -> dict[str, float]:
    script = workdir / "embeddings.lua"
    bodies = ",\n".join(json.dumps(json.dumps({"model": model_id, "input": t})) for t in texts)
    script.write_text(f"bodies = {{\n{bodies}\n}}\n{WRK_SCRIPT}")
    proc = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script),
                           base], capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    n, dur, p50, p95, p99, status_err, conn_err = line.split()[1:]
    if int(status_err) or int(conn_err):
        raise RuntimeError(f"wrk saw {status_err} HTTP errors and {conn_err} connect errors")
    return {"requests": int(n), "throughput_rps": int(n) / float(dur), "p50_ms": float(p50),
            "p95_ms": float(p95), "p99_ms": float(p99)}


def serve_and_measure(model_dir: Path, extra: list[str], texts: list[str], per_level: int,
                      use_wrk: bool, seconds: int, workdir: Path) -> tuple[dict[str, Any], str]:
    with served("--embedding-model", str(model_dir), "--embedding-device", "cpu",
                *extra) as base:
        model_id = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        url = base + "/v1/embeddings"
        digest_resp = httpx.post(url, json={"model": model_id, "input": texts[:32]}, timeout=60)
        vectors = np.array([d["embedding"] for d in digest_resp.json()["data"]])
        digest = hashlib.sha256(np.round(vectors, 4).astype("<f4").tobytes()).hexdigest()
        results: dict[str, Any] = {}
        for c in CONCURRENCY:
            if use_wrk:
                wrk_load(base, model_id, texts, c, 1, workdir)  # warm-up
                results[str(c)] = wrk_load(base, model_id, texts, c, seconds, workdir)
            else:
                n = max(per_level, 8 * c)
                anyio.run(load, url, model_id, texts[:64], c)  # warm-up
                results[str(c)] = anyio.run(load, url, model_id, texts[:n], c)
        results["server_stats"] = httpx.get(base + "/health").json()["models"][0]["stats"]
    return results, digest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_models_dir() / "all-minilm-l6-v2")
    ap.add_argument("--requests", type=int, default=512,
                    help="requests per concurrency level (Python client)")
    ap.add_argument("--seconds", type=int, default=5, help="seconds per level (wrk)")
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/embeddings.json")
    args = ap.parse_args()
    texts = make_texts(max(args.requests, 8 * max(CONCURRENCY)))

    model = EmbeddingModel.load(args.model, device="cpu")
    raw = raw_baseline(model, texts[:512])
    del model
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk") is not None)
    with tempfile.TemporaryDirectory() as tmp:
        batched, digest = serve_and_measure(args.model, [], texts, args.requests, use_wrk,
                                            args.seconds, Path(tmp))
        unbatched, digest_off = serve_and_measure(
            args.model, ["--embedding-max-batch", "1"], texts, args.requests, use_wrk,
            args.seconds, Path(tmp))
    c32, c1 = batched["32"], batched["1"]
    verdict = {
        "c32_vs_raw_best": c32["throughput_rps"] / raw["best_throughput"],
        "c32_vs_unbatched": c32["throughput_rps"] / unbatched["32"]["throughput_rps"],
        "c1_p50_minus_raw_single_p50_ms": c1["p50_ms"] - raw["single_p50_ms"],
        "digests_agree": digest == digest_off,
    }
    verdict["c32_vs_raw_target_met"] = verdict["c32_vs_raw_best"] >= 0.8
    verdict["c32_vs_unbatched_target_met"] = verdict["c32_vs_unbatched"] >= 3.0
    verdict["c1_latency_target_met"] = verdict["c1_p50_minus_raw_single_p50_ms"] <= 3.0
    report = {"benchmark": "embeddings", "model": str(args.model), "texts": "5-40 words",
              "load_generator": "wrk" if use_wrk else "python-httpx",
              "machine": {"cpus": len(__import__("os").sched_getaffinity(0)),
                          "platform": platform.platform(), "python": platform.python_version()},
              "raw": raw, "batched": batched, "unbatched": unbatched,
              "vector_digest": digest, "verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    client = "wrk" if use_wrk else "python httpx (install wrk for less client overhead)"
    print(f"load generator: {client}")
    print(f"raw onnxruntime: best {raw['best_throughput']:.0f} texts/s at batch "
          f"{raw['best_batch']}; single-input p50 {raw['single_p50_ms']:.2f} ms")
    print(f"{'concurrency':>11} | {'batched req/s':>13} {'p50':>7} {'p95':>7} {'p99':>7} | "
          f"{'unbatched req/s':>15} {'p50':>7} {'p95':>7} {'p99':>7}")
    for c in CONCURRENCY:
        b, u = batched[str(c)], unbatched[str(c)]
        print(f"{c:>11} | {b['throughput_rps']:>13.0f} {b['p50_ms']:>7.1f} {b['p95_ms']:>7.1f} "
              f"{b['p99_ms']:>7.1f} | {u['throughput_rps']:>15.0f} {u['p50_ms']:>7.1f} "
              f"{u['p95_ms']:>7.1f} {u['p99_ms']:>7.1f}")
    print(f"c=32 vs raw best: {verdict['c32_vs_raw_best']:.2f}x (target >= 0.8: "
          f"{'met' if verdict['c32_vs_raw_target_met'] else 'NOT met'})")
    print(f"c=32 vs batching off: {verdict['c32_vs_unbatched']:.2f}x (target >= 3: "
          f"{'met' if verdict['c32_vs_unbatched_target_met'] else 'NOT met'})")
    print(f"c=1 p50 - raw single p50: {verdict['c1_p50_minus_raw_single_p50_ms']:.2f} ms "
          f"(target <= 3: {'met' if verdict['c1_latency_target_met'] else 'NOT met'})")
    print(f"vector digest {digest[:16]} (batching off: {digest_off[:16]})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
