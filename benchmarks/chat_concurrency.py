"""Chat throughput against concurrent streams, with continuous batching.

In one run, on the same model folder:
  ceiling     in-process decode steps over the KV pool, no server: B rows stepped by one model
              run, for B = 1, 2, 4, 8, 16 (the most batching can give)
  sse         `npugate serve`, B concurrent greedy SSE streams: per-stream and aggregate
              tokens/s, TTFT, and p50/p95 gaps between content chunks (inter-token latency)
  admission   4 running SSE streams while a ~4000-token prompt is admitted: their p95 and max
              inter-token gap from its arrival to its first token, and its TTFT
Targets (issue 10): 8 streams >= 3.0x and 4 >= 2.2x the aggregate tok/s of one; p95
inter-token latency at 8 streams <= 3x one stream's. Results go to
benchmarks/results/chat_concurrency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chat_stream import MESSAGES  # noqa: E402
from benchmarks.served import (  # noqa: E402
    gaps,
    level_stats,
    percentile,
    served,
    stream_chat,
)
from inference.chat.kv_pool import KVPool  # noqa: E402
from inference.chat.model import ChatModel  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

LEVELS = (1, 2, 4, 8, 16)
LONG_PROMPT = [{"role": "user", "content": "Summarise this log. " + " ".join(
    f"line {i}: the service answered request {i * 7} in {i % 13} ms." for i in range(208))}]


def ceiling(model: ChatModel, steps: int = 32) -> dict[str, dict[str, float]]:
    """Decode steps of B rows at once, straight on the model and pool (no scheduler)."""
    prompt = model.encode_prompt(MESSAGES)
    out = {}
    for rows in (1, *LEVELS):  # the first pass warms up and is not kept
        pool = KVPool(model.kv_layout(), budget_bytes=2**31, max_rows=rows)
        for _ in range(rows):
            model.prefill(pool, pool.add(len(prompt) + steps + 1), prompt)
        tokens: list[int | None] = [int(np.argmax(model.decode(pool, [0] * rows)[0]))] * rows
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model.decode(pool, tokens)
            times.append(time.perf_counter() - t)
        step = statistics.median(times)
        out[str(rows)] = {"step_ms_p50": step * 1e3, "aggregate_tok_s": rows / step}
    return out  # the warm-up's entry was overwritten by the measured one


def sse_level(url: str, model: str, streams: int, max_tokens: int) -> dict[str, float]:
    runs: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: runs.append(
        stream_chat(url, model, MESSAGES, max_tokens))) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    itl = [g for r in runs for g in gaps(r["arrivals"])]
    return {"per_stream_tok_s_p50": statistics.median(r["tok_s"] for r in runs),
            **level_stats([r["ttft_s"] for r in runs], sum(r["tokens"] for r in runs), wall),
            "itl_ms_p50": percentile(itl, 50) * 1e3, "itl_ms_p95": percentile(itl, 95) * 1e3}


def admission(url: str, model: str, running: int = 4) -> dict[str, float]:
    """Running streams' inter-token gaps while a long prompt is prefilled."""
    runs: list[dict[str, Any]] = []
    long: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda: runs.append(
        stream_chat(url, model, MESSAGES, 400))) for _ in range(running)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # they are decoding
    arrived = time.perf_counter()
    long.update(stream_chat(url, model, LONG_PROMPT, 4))
    first_token = arrived + long["ttft_s"]
    for t in threads:
        t.join()
    during = [g for r in runs for g in gaps(r["arrivals"], arrived, first_token)]
    before = [g for r in runs for g in gaps(r["arrivals"], 0, arrived)]
    usage = httpx.post(url, json={"model": model, "messages": LONG_PROMPT, "max_tokens": 1},
                       timeout=120).json()["usage"]
    return {"long_prompt_tokens": usage["prompt_tokens"], "long_ttft_s": long["ttft_s"],
            "itl_ms_p95_before": percentile(before, 95) * 1e3,
            "itl_ms_p95_during": percentile(during, 95) * 1e3,
            "itl_ms_max_during": max(during, default=float("nan")) * 1e3,
            "gaps_during": len(during)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks/results/chat_concurrency.json")
    args = ap.parse_args()
    ceil = ceiling(ChatModel.load(args.model))
    time.sleep(1.0)
    results: dict[str, dict[str, float]] = {}
    with served("--max-running", str(max(LEVELS)), "--chat-model", str(args.model)) as base:
        url = base + "/v1/chat/completions"
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        stream_chat(url, model, MESSAGES, 16)  # warm-up
        for level in LEVELS:
            time.sleep(0.5)
            results[str(level)] = sse_level(url, model, level, args.max_tokens)
        health = httpx.get(base + "/health").json()
        memory = {"peak_rss_bytes": health["memory"]["peak_rss_bytes"],
                  "kv_budget_bytes": health["models"][0]["kv_cache"]["budget_bytes"]}
        time.sleep(0.5)
        admitted = admission(url, model)
        metrics = httpx.get(base + "/metrics").text
    one = results["1"]
    verdict = {
        "x4_vs_1": results["4"]["aggregate_tok_s"] / one["aggregate_tok_s"],
        "x8_vs_1": results["8"]["aggregate_tok_s"] / one["aggregate_tok_s"],
        "itl_p95_8_vs_1": results["8"]["itl_ms_p95"] / one["itl_ms_p95"]}
    verdict |= {"x4_target_met": verdict["x4_vs_1"] >= 2.2,
                "x8_target_met": verdict["x8_vs_1"] >= 3.0,
                "itl_target_met": verdict["itl_p95_8_vs_1"] <= 3.0}
    batch_lines = [ln for ln in metrics.splitlines()
                   if ln.startswith("npugate_decode_batch_size_") and "bucket" not in ln]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "chat_concurrency", "model": str(args.model),
        "max_tokens": args.max_tokens, "ceiling": ceil, "sse": results,
        "admission": admitted, "verdict": verdict, "memory": memory,
        "decode_batch_metrics": batch_lines},
        indent=2) + "\n")
    print(f"{'rows':>5} {'in-process step ms':>19} {'ceiling tok/s':>14}")
    for rows, c in ceil.items():
        print(f"{rows:>5} {c['step_ms_p50']:>19.1f} {c['aggregate_tok_s']:>14.1f}")
    print(f"\n{'streams':>7} {'per-stream tok/s':>17} {'aggregate tok/s':>16} {'vs 1':>6} "
          f"{'TTFT p50 ms':>12} {'TTFT max ms':>12} {'ITL p50 ms':>11} {'ITL p95 ms':>11}")
    for streams, r in results.items():
        print(f"{streams:>7} {r['per_stream_tok_s_p50']:>17.1f} {r['aggregate_tok_s']:>16.1f} "
              f"{r['aggregate_tok_s'] / one['aggregate_tok_s']:>6.2f} "
              f"{r['ttft_s_p50'] * 1e3:>12.0f} {r['ttft_s_max'] * 1e3:>12.0f} "
              f"{r['itl_ms_p50']:>11.1f} {r['itl_ms_p95']:>11.1f}")
    print(f"\nserver peak RSS after the 16-stream level: "
          f"{memory['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(KV budget {memory['kv_budget_bytes'] / 2**20:.0f} MiB)")
    a = admitted
    print(f"\nadmitting a {a['long_prompt_tokens']}-token prompt beside 4 streams: its TTFT "
          f"{a['long_ttft_s']:.2f} s; their ITL p95 {a['itl_ms_p95_before']:.1f} ms before, "
          f"{a['itl_ms_p95_during']:.1f} ms during (max {a['itl_ms_max_during']:.1f} ms)")
    for name, met, target in (("x4_vs_1", "x4_target_met", ">= 2.2"),
                              ("x8_vs_1", "x8_target_met", ">= 3.0"),
                              ("itl_p95_8_vs_1", "itl_target_met", "<= 3.0")):
        print(f"{name} = {verdict[name]:.2f}  (target {target}: "
              f"{'met' if verdict[met] else 'NOT met'})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
