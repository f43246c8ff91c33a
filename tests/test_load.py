"""A bounded load test on loopback: thousands of embeddings, a hundred streamed chats with a
third of the clients leaving mid-stream. Nothing lost, swapped or leaked; zero 5xx.

Bounds: 5000 embedding requests at concurrency 64 and 100 chats at concurrency 8 (about a
minute on 2 cores); memory may grow by at most 300 MB (the first requests warm caches).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import orjson

from inference.embed.model import EmbeddingModel
from tests.conftest import LiveServer

EMB = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
           "Say something about the sea."]
EMBEDDINGS = 5000
CHATS = 100
MEMORY_GROWTH_LIMIT = 300 * 1024 * 1024
# Hypercorn 0.18 keeps a closed connection's task until its keep-alive timer ends, so the
# test's server uses 3 s and the task count is read after that.
KEEP_ALIVE_REAP_S = 4.0


def test_load_embeddings_and_chats(smollm2_dir: Path, minilm_dir: Path,
                                   minilm: EmbeddingModel, tmp_path: Path) -> None:
    server = LiveServer(chat=[smollm2_dir], embedding=[minilm_dir], log=tmp_path / "s.log",
                        extra=["--keep-alive-timeout", "3"])
    try:
        texts = [f"load text {i}: {' '.join(random.Random(i).sample(PROMPTS[3].split(), 4))}"
                 for i in range(200)]
        expected = dict(zip(texts, minilm.embed_batch(minilm.tokenize(texts)), strict=True))
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            greedy = {p: http.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": p}],
                "temperature": 0, "max_tokens": 12}).json()["choices"][0]["message"]["content"]
                for p in PROMPTS}
        time.sleep(KEEP_ALIVE_REAP_S)
        baseline = _health(server.base_url)
        results: dict[str, Any] = {"statuses": [], "bad_vectors": 0, "chat_mismatch": 0,
                                   "chats_done": 0, "left": 0}
        anyio.run(_drive, server.base_url, texts, expected, greedy, results)
        time.sleep(KEEP_ALIVE_REAP_S)
        after = _health(server.base_url)
    finally:
        server.stop()

    assert all(s < 500 for s in results["statuses"]), sorted(set(results["statuses"]))
    assert results["statuses"].count(200) == len(results["statuses"]) == EMBEDDINGS + CHATS
    assert results["bad_vectors"] == 0  # every vector belongs to its own request's text
    assert results["chat_mismatch"] == 0  # every finished stream is its prompt's answer
    assert results["left"] == 33 and results["chats_done"] == 67
    chat, emb = (next(m for m in after["models"] if m["id"] == mid) for mid in (CHAT, EMB))
    assert chat["requests_running"] == 0 and chat["requests_waiting"] == 0
    assert emb["inputs_queued"] == 0
    assert emb["stats"]["model_runs_total"] < EMBEDDINGS  # batched
    assert after["tasks"] <= baseline["tasks"] + 2  # no leaked tasks
    growth = after["memory"]["rss_bytes"] - baseline["memory"]["rss_bytes"]
    assert growth < MEMORY_GROWTH_LIMIT, growth


def _health(base: str) -> dict[str, Any]:
    """One /health read on its own connection, which the server closes after answering, so
    no idle connection (and no Hypercorn task waiting on it) outlives the read."""
    resp = httpx.get(f"{base}/health", headers={"Connection": "close"}, timeout=10)
    resp.raise_for_status()
    return dict(resp.json())


async def _drive(base: str, texts: list[str], expected: dict[str, np.ndarray],
                 greedy: dict[str, str], results: dict[str, Any]) -> None:
    # Idle connections expire client-side before the server's 3 s keep-alive closes them, as a
    # well-configured client does; otherwise a reused connection can race the server's close.
    limits = httpx.Limits(max_connections=80, max_keepalive_connections=80,
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        embed_jobs = list(range(EMBEDDINGS))
        chat_jobs = list(range(CHATS))

        async def embedder() -> None:
            while embed_jobs:
                text = texts[embed_jobs.pop() % len(texts)]
                resp = await client.post("/v1/embeddings", json={"model": EMB, "input": text})
                results["statuses"].append(resp.status_code)
                if resp.status_code == 200:
                    got = np.array(resp.json()["data"][0]["embedding"])
                    if float(got @ expected[text]) < 0.99999:
                        results["bad_vectors"] += 1

        async def chatter() -> None:
            while chat_jobs:
                n = chat_jobs.pop()
                prompt = PROMPTS[n % len(PROMPTS)]
                leave = n % 3 == 0 and n < 99  # 33 clients disconnect mid-stream
                body = {"model": CHAT, "messages": [{"role": "user", "content": prompt}],
                        "temperature": 0, "max_tokens": 12, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    results["statuses"].append(resp.status_code)
                    pieces, events = [], 0
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        events += 1
                        chunk = orjson.loads(line[6:])
                        for choice in chunk.get("choices", []):
                            pieces.append(choice["delta"].get("content") or "")
                        if leave and events >= 3:
                            break
                if leave:
                    results["left"] += 1
                    continue
                results["chats_done"] += 1
                if "".join(pieces) != greedy[prompt]:
                    results["chat_mismatch"] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(embedder)
            for _ in range(8):
                tg.start_soon(chatter)
