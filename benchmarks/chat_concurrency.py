"""How chat decoding shares the device: per-stream and aggregate tokens/s, and TTFT, against
the number of concurrent SSE streams on `npugate serve`. Concurrency 1 is the baseline in the
same run. It is the measurement behind the default of --max-running.
Results go to benchmarks/results/chat_concurrency.json.
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

from benchmarks.chat_stream import MESSAGES  # noqa: E402
from benchmarks.served import (  # noqa: E402
    LEVEL_HEADER,
    level_cells,
    level_stats,
    served,
    stream_chat,
)
from inference.prepare import default_models_dir  # noqa: E402

LEVELS = (1, 2, 4, 8, 16)


def one_stream(url: str, model: str, max_tokens: int, out: list[dict[str, Any]]) -> None:
    out.append(stream_chat(url, model, MESSAGES, max_tokens))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks/results/chat_concurrency.json")
    args = ap.parse_args()
    results = {}
    with served("--max-running", str(max(LEVELS)), "--chat-model", str(args.model)) as base:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        one_stream(base + "/v1/chat/completions", model, 16, [])  # warm-up
        for level in LEVELS:
            time.sleep(0.5)
            runs: list[dict[str, Any]] = []
            threads = [threading.Thread(target=one_stream, args=(
                base + "/v1/chat/completions", model, args.max_tokens, runs))
                for _ in range(level)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            results[str(level)] = {
                "per_stream_tok_s_p50": statistics.median(r["tok_s"] for r in runs),
                **level_stats([r["ttft_s"] for r in runs], sum(r["tokens"] for r in runs), wall)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "chat_concurrency", "model": str(args.model),
                                    "max_tokens": args.max_tokens, "levels": results},
                                   indent=2) + "\n")
    print(f"{'streams':>7} {'per-stream tok/s':>17} {LEVEL_HEADER}")
    for streams, r in results.items():
        print(f"{streams:>7} {r['per_stream_tok_s_p50']:>17.1f} {level_cells(r)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
