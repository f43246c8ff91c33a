"""The measurements behind the request, queue and WebSocket limit defaults.

1. admission: what a request costs before the context-length check can refuse it, against its
   message count and at the body-size limit (event-loop time to parse and validate; worker
   time to render and tokenize), and how much the default model's context can hold.
2. queue: a burst of streamed chats against `--max-running` with an unbounded queue: how
   long a request waits (its TTFT) against how many requests are ahead of it. The default of
   --max-waiting is the longest queue whose last request still starts within --budget-s.
3. socket: N conversations multiplexed on one WebSocket: aggregate tokens/s and TTFT against
   N, with N=1 as the baseline in the same run.

Results go to benchmarks/results/limits.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import (  # noqa: E402
    LEVEL_HEADER,
    level_cells,
    level_stats,
    served,
    stream_chat,
)
from inference.chat.model import ChatModel  # noqa: E402
from inference.errors import ContextTooLong  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from server.core.errors import APIError  # noqa: E402
from server.core.http import parse_json_body  # noqa: E402
from server.core.metrics import Metrics  # noqa: E402
from server.core.registry import ModelRegistry  # noqa: E402
from server.openai.chat import ChatService  # noqa: E402
from server.openai.wire import EmbeddingRequest, parse_model  # noqa: E402
from server.settings import Settings  # noqa: E402

MIB = 1024 * 1024
# Everyday prompts; under greedy decoding the 135M default model often runs to the length
# limit, so every reply is max_tokens long and the workload is the same in every run.
PROMPTS = ["Explain what a hash table is.", "Give me three tips for sleeping better.",
           "How do I reverse a list in Python?", "Summarize the plot of Romeo and Juliet.",
           "Write a short story about a lighthouse keeper.", "What is the capital of France?",
           "Describe how a bicycle works.", "Why is the sky blue?"]


def _ms(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _chat_body(n: int, content: str = "hi") -> bytes:
    roles = ("user", "assistant")
    return orjson.dumps({"model": "m", "messages": [
        {"role": roles[i % 2], "content": content} for i in range(n | 1)]})


def admission(model: ChatModel, max_messages: int, body_limit: int) -> dict[str, Any]:
    service = ChatService(ModelRegistry(), Metrics(ModelRegistry()), max_messages=1 << 30,
                          max_tokens_limit=Settings().max_tokens_limit)
    ctx = model.spec.context_length

    def encode(body: bytes) -> list[int]:
        req = service.parse(parse_json_body(body))
        return model.encode_prompt([{"role": m.role, "content": m.text()} for m in req.messages])

    one, hundred_one = (len(model.encode_prompt([{"role": "user", "content": ""}] * n))
                        for n in (1, 101))
    per_message = (hundred_one - one) / 100
    license_text = (REPO / "LICENSE").read_text()
    bytes_per_token = len(license_text.encode()) / len(model.tokenizer.encode(license_text).ids)
    longest = max(len(orjson.dumps(model.tokenizer.decode([i], skip_special_tokens=False))) - 2
                  for i in range(model.tokenizer.get_vocab_size()))  # JSON-escaped bytes
    counts = {}
    for n in (256, 1024, 2048, 4096):
        body = _chat_body(n)
        counts[str(n | 1)] = {
            "body_bytes": len(body),
            "loop_ms": _ms(lambda b=body: service.parse(parse_json_body(b))),  # type: ignore[misc]
            "encode_ms": _ms(lambda b=body: encode(b)),  # type: ignore[misc]
            "prompt_tokens": len(encode(body))}
    # Bodies at the size limit, shaped to cost the most.
    tiny = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": ""}] * (
        body_limit // len(b'{"role":"user","content":""},'))})
    limited = ChatService(ModelRegistry(), Metrics(ModelRegistry()), max_messages=max_messages,
                          max_tokens_limit=Settings().max_tokens_limit)

    def refused(b: bytes) -> None:
        try:
            limited.parse(parse_json_body(b))
        except APIError as exc:
            assert exc.status == 413, exc
            return
        raise AssertionError("not refused")

    def refused_context(b: bytes) -> None:
        try:
            encode(b)
        except ContextTooLong:
            return
        raise AssertionError("not refused")

    parts = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": ""}] * (body_limit // len(b'{"type":"text","text":""},'))}]})
    one_id_lists = orjson.dumps({"model": "e", "input": [[1]] * (body_limit // 4)})
    text = (license_text * (body_limit // len(license_text) + 1))[:body_limit - 100]
    long_body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    strings = orjson.dumps({"model": "e", "input": ["a"] * (body_limit // 4)})
    at_limit = {
        "tiny_messages": {"messages": tiny.count(b"role"),
                          "loop_ms_unlimited": _ms(lambda: service.parse(parse_json_body(tiny))),
                          "loop_ms_refused": _ms(lambda: refused(tiny))},
        "text_parts": {"loop_ms_unlimited": _ms(lambda: service.parse(parse_json_body(parts))),
                       "loop_ms_refused": _ms(lambda: refused(parts))},
        "one_long_text": {"loop_ms": _ms(lambda: service.parse(parse_json_body(long_body))),
                          "tokenize_ms": _ms(lambda: model.tokenizer.encode(text), repeat=1),
                          "refused_ms": _ms(lambda: refused_context(long_body))},
        "embedding_strings": {"loop_ms": _ms(lambda: parse_model(
            EmbeddingRequest, parse_json_body(strings)))},
        "embedding_one_id_lists": {"loop_ms": _ms(lambda: parse_model(
            EmbeddingRequest, parse_json_body(one_id_lists)))},
    }
    return {"context_length": ctx, "tokens_per_empty_message": per_message,
            "prompt_overhead_tokens": one - per_message,
            "most_messages_that_fit": int((ctx - (one - per_message)) // per_message),
            "english_bytes_per_token": bytes_per_token,
            "longest_token_json_bytes": longest,
            "largest_fitting_body_english_bytes": int(ctx * bytes_per_token),
            "largest_fitting_body_worst_bytes": ctx * longest,
            "by_message_count": counts, "body_limit_bytes": body_limit, "at_body_limit": at_limit}


def queue(base: str, model: str, requests: int, max_tokens: int, running: int,
          budget_s: float) -> dict[str, Any]:
    url = base + "/v1/chat/completions"
    results: list[dict[str, Any]] = [{} for _ in range(requests)]

    def run(i: int) -> None:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        results[i] = stream_chat(url, model, messages, max_tokens)

    threads = []
    for i in range(requests):  # in order: request i has i requests ahead of it
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert all(r["status"] == 200 for r in results), [r["status"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    waited = ttft[running:]  # queued requests, in arrival order
    # seconds of wait each request ahead adds, from a least-squares line through the queue
    xs = list(range(1, len(waited) + 1))
    slope = statistics.linear_regression(xs, waited).slope
    fits = [i for i, w in enumerate(waited, start=1) if w <= budget_s]
    longest_ok = max(fits) if fits else 0
    return {"requests": requests, "max_tokens": max_tokens, "max_running": running,
            "ttft_s": ttft, "wait_s_per_request_ahead": slope,
            "budget_s": budget_s, "longest_queue_within_budget": longest_ok,
            "wall_s": max(r["end_s"] for r in results)}


async def _socket_run(url: str, model: str, n: int, max_tokens: int) -> dict[str, float]:
    from websockets.asyncio.client import connect

    firsts: dict[str, float] = {}
    tokens = 0
    async with connect(url, max_size=None) as ws:
        t0 = time.perf_counter()
        for i in range(n):
            await ws.send(orjson.dumps({"type": "chat.create", "id": str(i), "request": {
                "model": model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}}).decode())
        done = 0
        while done < n:
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "chat.delta" and msg["chunk"]["choices"][0]["delta"].get("content"):
                firsts.setdefault(msg["id"], time.perf_counter() - t0)
            elif msg["type"] == "chat.done":
                done += 1
                tokens += msg["usage"]["completion_tokens"]
            elif msg["type"] == "error":
                raise RuntimeError(msg)
        wall = time.perf_counter() - t0
    return level_stats(list(firsts.values()), tokens, wall)


def socket(base: str, model: str, max_tokens: int) -> dict[str, Any]:
    url = base.replace("http", "ws", 1) + "/v1/ws"
    return {str(n): anyio.run(_socket_run, url, model, n, max_tokens) for n in (1, 4, 8, 16)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--queue-requests", type=int, default=56)
    ap.add_argument("--queue-max-tokens", type=int, default=128,
                    help="reply length in the queue burst (about a paragraph)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="the longest a queued request should wait for its first token")
    ap.add_argument("--max-running", type=int, default=Settings().max_running_per_model)
    ap.add_argument("--max-messages", type=int, default=2048)
    ap.add_argument("--body-limit", type=int, default=4 * MIB)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/limits.json")
    args = ap.parse_args()

    adm = admission(ChatModel.load(args.model), args.max_messages, args.body_limit)
    with served("--chat-model", str(args.model),
                "--max-running", str(args.max_running), "--max-waiting", "100000",
                "--ws-max-conversations", "64") as base:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        stream_chat(base + "/v1/chat/completions", model, [{"role": "user", "content": "hi"}],
                    8)  # warm-up
        q = queue(base, model, args.queue_requests, args.queue_max_tokens, args.max_running,
                  args.budget_s)
        time.sleep(1)
        s = socket(base, model, 64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "limits", "model": str(args.model),
                                    "admission": adm, "queue": q, "socket": s},
                                   indent=2) + "\n")

    print(f"context {adm['context_length']} tokens; an empty message takes "
          f"{adm['tokens_per_empty_message']:.0f}; at most {adm['most_messages_that_fit']} "
          "messages fit")
    print(f"largest request that fits: ~{adm['largest_fitting_body_english_bytes'] / 1024:.0f} "
          f"KiB of English ({adm['english_bytes_per_token']:.2f} bytes/token), "
          f"{adm['largest_fitting_body_worst_bytes'] / 1024:.0f} KiB at worst "
          f"({adm['longest_token_json_bytes']}-byte longest token, JSON-escaped)")
    print(f"{'messages':>8} {'body KiB':>9} {'loop ms':>8} {'encode ms':>10} {'tokens':>7}")
    for n, r in adm["by_message_count"].items():
        print(f"{n:>8} {r['body_bytes'] / 1024:>9.0f} {r['loop_ms']:>8.2f} "
              f"{r['encode_ms']:>10.1f} {r['prompt_tokens']:>7}")
    lim = adm["at_body_limit"]
    print(f"at the {args.body_limit / MIB:g} MiB body limit, event-loop time to parse and "
          f"validate: {lim['tiny_messages']['messages']} tiny messages "
          f"{lim['tiny_messages']['loop_ms_unlimited']:.0f} ms unchecked, "
          f"{lim['tiny_messages']['loop_ms_refused']:.0f} ms refused by count; text parts "
          f"{lim['text_parts']['loop_ms_unlimited']:.0f} ms unchecked, "
          f"{lim['text_parts']['loop_ms_refused']:.0f} ms refused; one long text "
          f"{lim['one_long_text']['loop_ms']:.1f} ms, then "
          f"{lim['one_long_text']['tokenize_ms']:.0f} ms to tokenize it, "
          f"{lim['one_long_text']['refused_ms']:.0f} ms refused by size; "
          f"embedding strings {lim['embedding_strings']['loop_ms']:.0f} ms; one-id lists "
          f"{lim['embedding_one_id_lists']['loop_ms']:.0f} ms unchecked")
    print(f"queue: {q['requests']} streams of {q['max_tokens']} tokens at max-running "
          f"{q['max_running']}: each "
          f"request ahead adds {q['wait_s_per_request_ahead']:.2f} s of wait; the longest "
          f"queue within {q['budget_s']:g} s is {q['longest_queue_within_budget']} "
          f"(last queued TTFT {q['ttft_s'][-1]:.1f} s)")
    print(f"{'socket conversations':>20} {LEVEL_HEADER}")
    for n, r in s.items():
        print(f"{n:>20} {level_cells(r)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
