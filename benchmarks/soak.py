"""Soak: does the server's memory stay flat under mixed load?

`npugate serve` with the default models, for `--minutes` (10 by default), under:
  - 3 chat workers, each holding multi-turn conversations (4 turns, distinct topics, streamed
    over SSE, so the prompt cache keeps and evicts entries all along);
  - 1 structured-output worker (a JSON schema, `response_format`);
  - 2 embedding workers (1-8 distinct texts a request, so the embedding cache fills and
    evicts).
Every 10 s it reads the server's RSS (/proc/PID/status) and what its KV pool and prompt cache
hold (/health). It prints the curve and the spread of RSS after the first two minutes (target:
within 10%), and writes benchmarks/results/soak.json. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import served_process  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from inference.prepare.recipes import DEFAULT_MODELS, RECIPES, build_model  # noqa: E402

CHAT, EMBEDDING = "smollm2-135m-instruct", "all-minilm-l6-v2"
TOPICS = ["lighthouses", "bread", "volcanoes", "chess", "bees", "trains", "rivers", "jazz",
          "glaciers", "bicycles", "comets", "gardens", "owls", "bridges", "tea", "maps"]
TURNS = ["Tell me about {t}.", "Why do people care about {t}?", "Give one surprising fact.",
         "Summarise what you said in one sentence."]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "score"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "score": {"type": "integer", "minimum": 0, "maximum": 10}}}
WARMUP_S = 120.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def chat_worker(client: httpx.AsyncClient, rng: random.Random, counts: dict[str, int],
                      until: float) -> None:
    while time.monotonic() < until:
        topic = f"{rng.choice(TOPICS)} (case {rng.randrange(10**6)})"
        messages: list[dict[str, str]] = []
        for turn in TURNS:
            messages.append({"role": "user", "content": turn.format(t=topic)})
            text = []
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": CHAT, "messages": messages, "max_tokens": 48, "stream": True,
                    "temperature": 0.7, "seed": rng.randrange(1000)}) as resp:
                counts["errors"] += resp.status_code != 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:])["choices"]:
                            text.append(choice["delta"].get("content") or "")
            messages.append({"role": "assistant", "content": "".join(text)})
            counts["chat"] += 1
            if time.monotonic() >= until:
                return


async def structured_worker(client: httpx.AsyncClient, rng: random.Random,
                            counts: dict[str, int], until: float) -> None:
    while time.monotonic() < until:
        resp = await client.post("/v1/chat/completions", json={
            "model": CHAT, "max_tokens": 64,
            "messages": [{"role": "user", "content": f"Rate {rng.choice(TOPICS)} out of 10."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "rating", "schema": SCHEMA}}})
        counts["errors"] += resp.status_code != 200
        counts["structured"] += 1


async def embedding_worker(client: httpx.AsyncClient, rng: random.Random,
                           counts: dict[str, int], until: float) -> None:
    while time.monotonic() < until:
        texts = [f"{rng.choice(TOPICS)} note {rng.randrange(10**9)}"
                 for _ in range(rng.randint(1, 8))]
        resp = await client.post("/v1/embeddings", json={"model": EMBEDDING, "input": texts})
        counts["errors"] += resp.status_code != 200
        counts["embeddings"] += 1


async def sampler(client: httpx.AsyncClient, pid: int, started: float, until: float,
                  samples: list[dict[str, Any]], counts: dict[str, int]) -> None:
    while True:
        health = (await client.get("/health")).json()
        chat = next((m for m in health.get("models", []) if m.get("id") == CHAT), {})
        kv = chat.get("kv_cache", {})
        sample = {"t_s": round(time.monotonic() - started), "rss_mib": rss_bytes(pid) / 2**20,
                  "kv_resident_mib": kv.get("resident_bytes", 0) / 2**20,
                  "kv_allocated_mib": kv.get("allocated_bytes", 0) / 2**20,
                  "prompt_cache_tokens": chat.get("prompt_cache", {}).get("tokens_held", 0),
                  **counts}
        samples.append(sample)
        print(f"  t={sample['t_s']:4d} s  RSS {sample['rss_mib']:7.1f} MiB  KV resident "
              f"{sample['kv_resident_mib']:6.1f} MiB  prompt cache "
              f"{sample['prompt_cache_tokens']:5d} tokens  requests {counts}", flush=True)
        if time.monotonic() >= until:
            return
        await anyio.sleep(10)


async def soak(base: str, pid: int, minutes: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    counts = {"chat": 0, "structured": 0, "embeddings": 0, "errors": 0}
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    until = started + minutes * 60
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(chat_worker, client, random.Random(rng.random() + i), counts, until)
            tg.start_soon(structured_worker, client, random.Random(rng.random()), counts, until)
            for i in range(2):
                tg.start_soon(embedding_worker, client, random.Random(rng.random() + i), counts,
                              until)
            tg.start_soon(sampler, client, pid, started, until, samples, counts)
    warmup = min(WARMUP_S, minutes * 30)  # a short run judges its second half
    settled = [s["rss_mib"] for s in samples if s["t_s"] >= warmup]
    low, high = min(settled), max(settled)
    late = [s["rss_mib"] for s in samples if s["t_s"] >= minutes * 30]
    return {"minutes": minutes, "warmup_s": warmup, "samples": samples, "requests": counts,
            "rss_after_warmup_mib": [round(low, 1), round(high, 1)],
            "rss_spread_after_warmup": (high - low) / low,
            "flat_within_10pct": (high - low) / low <= 0.10,
            # once the caches are full (they fill to their caps over the first minutes)
            "rss_second_half_mib": [round(min(late), 1), round(max(late), 1)],
            "rss_spread_second_half": (max(late) - min(late)) / min(late)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.json")
    args = ap.parse_args()
    for name in DEFAULT_MODELS:
        build_model(RECIPES[name], default_models_dir(), print)
    with served_process() as (base, proc):
        result = anyio.run(soak, base, proc.pid, args.minutes, args.seed)
    low, high = result["rss_after_warmup_mib"]
    print(f"soak: RSS after the first {result['warmup_s']:.0f} s: {low}-{high} MiB, spread "
          f"{result['rss_spread_after_warmup']:.1%} (target <= 10%: "
          f"{'met' if result['flat_within_10pct'] else 'NOT met'}); second half "
          f"{result['rss_second_half_mib'][0]}-{result['rss_second_half_mib'][1]} MiB, spread "
          f"{result['rss_spread_second_half']:.1%}; requests {result['requests']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
