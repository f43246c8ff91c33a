"""Two tenants on one model: tenant A holds 32 concurrent streams while tenant B sends one
request at a time. B's time to first token with and without A's flood, and A's aggregate
throughput with and without B.

In one run, on one model, greedy: this checkout's server (admission round-robin across
tenants) and, with `--baseline TREE`, another checkout's (first come, first served), each on a
fresh `npugate serve` with two API keys, alternating, `--repeats` times. Per server:
  alone   B sends 8 requests in turn (24-token answers): TTFT
  flood   A's 32 workers each run 3 streamed 128-token stories; B sends requests in turn
          until A is done: B's TTFT, A's aggregate tokens/s
  single  A's workload with B idle: aggregate tokens/s (the single-tenant figure)
Targets (issue 25): B's median TTFT under the flood at most 2x alone; the aggregate (both
tenants' generated tokens/s during the flood) within 5% of the single-tenant figure.
Results go to benchmarks/results/tenants.json.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import percentile, served, stream_chat  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

KEYS = {"a": "sk-tenant-a", "b": "sk-tenant-b"}
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(tenant: str) -> httpx.Client:
    return httpx.Client(timeout=600, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def b_requests(url: str, model: str, stop: threading.Event | None, count: int,
               tokens: list[int] | None = None) -> list[float]:
    """B's requests, one at a time: `count` of them, or until `stop` is set. Their TTFTs;
    their generated tokens are added to `tokens`."""
    ttfts: list[float] = []
    with client("b") as http:
        while (stop is None and len(ttfts) < count) or (stop is not None and not stop.is_set()):
            result = stream_chat(url, model, QUESTION, 24, client=http)
            assert result["status"] == 200, result
            ttfts.append(result["ttft_s"])
            if tokens is not None:
                tokens.append(result["tokens"])
    return ttfts


def a_flood(url: str, model: str, workers: int, each: int, max_tokens: int
            ) -> dict[str, float]:
    """A's workers, each running `each` stories in turn: aggregate tokens/s."""
    tokens = [0] * workers

    def worker(i: int) -> None:
        with client("a") as http:
            for _ in range(each):
                result = stream_chat(url, model, STORY, max_tokens, client=http)
                assert result["status"] == 200, result
                tokens[i] += result["tokens"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"tokens": sum(tokens), "wall_s": wall, "aggregate_tok_s": sum(tokens) / wall}


def measure(tree: Path, model_dir: Path, workers: int, each: int) -> dict[str, Any]:
    args = ["--chat-model", str(model_dir), "--api-key", KEYS["a"], "--api-key", KEYS["b"],
            "--max-waiting", "64"]
    with served(*args, tree=tree) as base:
        url = base + "/v1/chat/completions"
        model = model_dir.name
        b_requests(url, model, None, 2)  # warm-up
        alone = b_requests(url, model, None, 8)
        stop = threading.Event()
        flood_b: list[float] = []
        b_tokens: list[int] = []
        b_thread = threading.Thread(target=lambda: flood_b.extend(
            b_requests(url, model, stop, 0, b_tokens)))
        b_thread.start()
        flood = a_flood(url, model, workers, each, 128)
        stop.set()
        b_thread.join()
        single = a_flood(url, model, workers, each, 128)
    flood["b_tokens"] = sum(b_tokens)
    flood["both_tok_s"] = (flood["tokens"] + flood["b_tokens"]) / flood["wall_s"]
    return {"b_alone_ttft_s": alone, "b_flood_ttft_s": flood_b, "a_flood": flood,
            "a_single": single}


def summary(run: dict[str, Any]) -> dict[str, float]:
    alone = statistics.median(run["b_alone_ttft_s"])
    flood = statistics.median(run["b_flood_ttft_s"])
    return {"b_alone_ms": alone * 1e3, "b_flood_ms": flood * 1e3,
            "b_flood_p90_ms": percentile(run["b_flood_ttft_s"], 90) * 1e3,
            "b_requests_under_flood": len(run["b_flood_ttft_s"]),
            "b_flood_vs_alone": flood / alone,
            "a_flood_tok_s": run["a_flood"]["aggregate_tok_s"],
            "a_single_tok_s": run["a_single"]["aggregate_tok_s"],
            "both_flood_tok_s": run["a_flood"]["both_tok_s"],
            "both_flood_vs_single": run["a_flood"]["both_tok_s"]
            / run["a_single"]["aggregate_tok_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--baseline", type=Path, help="another checkout, measured in the same run")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--each", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tenants.json")
    args = ap.parse_args()
    trees = {"now": REPO, **({"baseline": args.baseline} if args.baseline else {})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(measure(tree, args.model, args.workers, args.each))
            time.sleep(1.0)
    summaries = {name: [summary(r) for r in rs] for name, rs in runs.items()}
    met = all(s["b_flood_vs_alone"] <= 2.0 and s["both_flood_vs_single"] >= 0.95
              for s in summaries["now"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "tenants", "model": str(args.model),
                                    "workers": args.workers, "each": args.each,
                                    "trees": {k: str(v) for k, v in trees.items()},
                                    "runs": runs, "summaries": summaries,
                                    "targets_met": met}, indent=2) + "\n")
    print(f"tenant A: {args.workers} streams x {args.each} stories of 128 tokens; tenant B: "
          f"one 24-token answer at a time; {args.model.name}, greedy")
    print("B: TTFT alone and under A's flood (median, p90, requests served); tokens/s: A's "
          "alone (single tenant), and A's and both tenants' during the flood")
    print(f"{'server':>9} {'run':>3} {'B alone ms':>11} {'B flood ms':>11} {'p90':>6} "
          f"{'n':>4} {'ratio':>6} {'single':>7} {'A flood':>8} {'both':>6} {'both/single':>12}")
    for name, ss in summaries.items():
        for i, s in enumerate(ss, 1):
            print(f"{name:>9} {i:>3} {s['b_alone_ms']:>11.0f} {s['b_flood_ms']:>11.0f} "
                  f"{s['b_flood_p90_ms']:>6.0f} {s['b_requests_under_flood']:>4} "
                  f"{s['b_flood_vs_alone']:>6.2f} {s['a_single_tok_s']:>7.1f} "
                  f"{s['a_flood_tok_s']:>8.1f} {s['both_flood_tok_s']:>6.1f} "
                  f"{s['both_flood_vs_single']:>12.2f}")
    print(f"targets (B under flood <= 2x alone; both tenants' tokens/s within 5% of the "
          f"single-tenant figure) met: {met}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
