"""Multi-turn chat with and without the prompt cache: time to first token per turn.

In one run, on the same model, `npugate serve` with the cache on and with `--no-prompt-cache`:
  single       one 12-turn greedy conversation, 120-token answers, every turn resending the
               whole history as chat clients do: TTFT and prompt/cached tokens per turn
  interleaved  4 such conversations at once (different openings), TTFT per turn (median)
Answers must be identical with and without the cache. Target (issue 13): with the cache, turn
12's TTFT at most 2x turn 2's. Results go to benchmarks/results/prompt_cache.json.
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
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import served  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

QUESTIONS = ["Tell me about lighthouses.", "Why are they built so tall?",
             "Who used to keep them?", "What did a keeper do at night?",
             "How did storms affect them?", "What replaced the keepers?",
             "Name a famous lighthouse.", "How old is it?", "Can people visit it?",
             "What is a lightship?", "Are lighthouses still useful?", "Summarise our chat."]
OPENINGS = ["", "Please be brief. ", "I am a student. ", "Answer simply. "]


def turn(url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One streamed turn: its TTFT, answer and usage (`headers`: an API key's, say)."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = 0.0
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", url, json=body, timeout=600, headers=headers) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["delta"]["content"])
    return {"ttft_s": first - t0, "answer": "".join(pieces),
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def conversation(url: str, model: str, opening: str, max_tokens: int,
                 out: list[dict[str, Any]]) -> None:
    messages: list[dict[str, str]] = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": opening + question})
        result = turn(url, model, messages, max_tokens)
        out.append(result)
        messages.append({"role": "assistant", "content": result["answer"]})


def measure(model_dir: Path, cache: bool, max_tokens: int) -> dict[str, Any]:
    args = ["--chat-model", str(model_dir)] + ([] if cache else ["--no-prompt-cache"])
    with served(*args) as base:
        url = base + "/v1/chat/completions"
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        turn(url, model, [{"role": "user", "content": "hi"}], 4)  # warm-up
        single: list[dict[str, Any]] = []
        conversation(url, model, "", max_tokens, single)
        time.sleep(0.5)
        runs: list[list[dict[str, Any]]] = [[] for _ in OPENINGS]
        threads = [threading.Thread(target=conversation, args=(url, model, o, max_tokens, r))
                   for o, r in zip(OPENINGS, runs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(base + "/health").json()["models"][0]["prompt_cache"]
    return {"single": single, "interleaved": runs, "cache_stats": stats}


def copy_against_prefill(model_dir: Path, tokens: int = 1344) -> dict[str, float]:
    """What a hit saves: copying cached KV against prefilling the same tokens."""
    from inference.chat.kv_pool import KVPool
    from inference.chat.model import ChatModel

    model = ChatModel.load(model_dir)
    ids = (model.encode_prompt([{"role": "user", "content": QUESTIONS[0]}]) * 100)[:tokens]
    pool = KVPool(model.kv_layout(), budget_bytes=2**31, max_rows=2)
    pool.add(tokens + 1)
    pool.add(tokens + 1)
    t = time.perf_counter()
    for i in range(0, tokens, 64):
        model.prefill(pool, 0, ids[i:i + 64])
    prefill = time.perf_counter() - t
    out = {"tokens": tokens, "prefill_ms": prefill * 1e3}
    for length in (64, tokens):
        t = time.perf_counter()
        pool.copy(0, 1, length)
        out[f"copy_{length}_ms"] = (time.perf_counter() - t) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/prompt_cache.json")
    args = ap.parse_args()
    copy = copy_against_prefill(args.model)
    off = measure(args.model, False, args.max_tokens)
    time.sleep(1.0)
    on = measure(args.model, True, args.max_tokens)
    same = [t["answer"] for t in on["single"]] == [t["answer"] for t in off["single"]] and \
        all([t["answer"] for t in a] == [t["answer"] for t in b]
            for a, b in zip(on["interleaved"], off["interleaved"], strict=True))
    ratio = on["single"][11]["ttft_s"] / on["single"][1]["ttft_s"]
    verdict = {"answers_identical": same, "turn12_vs_turn2_with_cache": ratio,
               "turn12_vs_turn2_without_cache":
                   off["single"][11]["ttft_s"] / off["single"][1]["ttft_s"],
               "target_met": ratio <= 2.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "prompt_cache", "model": str(args.model),
                                    "max_tokens": args.max_tokens, "off": off, "on": on,
                                    "copy_against_prefill": copy,
                                    "verdict": verdict}, indent=2) + "\n")

    def interleaved_ttft(run: dict[str, Any], i: int) -> float:
        return statistics.median(c[i]["ttft_s"] for c in run["interleaved"]) * 1e3

    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off ms':>12} {'TTFT on ms':>11} "
          f"{'4 interleaved off':>18} {'on':>6}")
    for i in range(len(QUESTIONS)):
        a, b = off["single"][i], on["single"][i]
        print(f"{i + 1:>4} {b['prompt_tokens']:>7} {b['cached_tokens']:>7} "
              f"{a['ttft_s'] * 1e3:>12.0f} {b['ttft_s'] * 1e3:>11.0f} "
              f"{interleaved_ttft(off, i):>18.0f} {interleaved_ttft(on, i):>6.0f}")
    print(f"answers identical with and without the cache: {same}")
    print(f"turn 12 / turn 2 TTFT: {ratio:.2f} with the cache (target <= 2: "
          f"{'met' if verdict['target_met'] else 'NOT met'}), "
          f"{verdict['turn12_vs_turn2_without_cache']:.2f} without")
    print(f"cache: {on['cache_stats']}")
    whole = copy[f"copy_{copy['tokens']}_ms"]
    print(f"a hit copies instead of prefilling: {copy['tokens']} tokens prefill in "
          f"{copy['prefill_ms']:.0f} ms, copy in {whole:.1f} ms; one 64-token chunk copies "
          f"in {copy['copy_64_ms']:.2f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
