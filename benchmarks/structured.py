"""Grammar-constrained decoding: its cost per token, and what hostile schemas do.

In one run, in process (the app served by Hypercorn on a loopback socket, httpx as the
client, SmolLM2, greedy):
  throughput   decode tok/s with a JSON schema against unconstrained decoding on the same
               prompt, alternating, at 1 and at 4 concurrent requests (target, issue 11:
               at least 0.9x), and the mask time per constrained token, p50/p99, from the
               engine's own timing of each mask fill on the device thread
  hostile      deeply nested, huge-enum, recursive, huge and invalid schemas: each request's
               status, and the longest stall of the event loop (a 5 ms ticker's largest lag)
               and of the device thread (the longest model run or mask fill) while it ran
               (target: none over 100 ms)
Results go to benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import hypercorn.config
import orjson
from hypercorn.asyncio import serve

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.chat.engine import ChatEngine  # noqa: E402
from inference.chat.model import ChatModel  # noqa: E402
from inference.limits import ChatLimits  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "List ten fruits, with a short note about each."}]
FRUITS = {"type": "object", "properties": {"fruits": {
    "type": "array", "minItems": 10, "maxItems": 10, "items": {
        "type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20},
            "note": {"type": "string", "maxLength": 60}},
        "required": ["name", "note"], "additionalProperties": False}}},
    "required": ["fruits"], "additionalProperties": False}


def _nested(depth: int) -> str:
    """JSON text (too deep for Python's own encoder to write)."""
    return ('{"type":"object","required":["a"],"properties":{"a":' * depth
            + '{"type":"integer"}' + "}}" * depth)


def _deep_array(depth: int) -> str:
    return '{"type":"array","items":' * depth + '{"type":"integer"}' + "}" * depth


HOSTILE: dict[str, dict[str, Any] | str] = {
    "nested_10": _nested(10),
    "array_nested_30": _deep_array(30),
    "nested_200": _nested(200),
    "nested_2000": _nested(2000),
    "enum_20000": {"type": "string", "enum": [f"value-{i}-{i * 7919 % 10007}"
                                              for i in range(20000)]},
    "recursive": {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "properties": {"v": {"type": "integer"}, "kids": {
            "type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"], "additionalProperties": False}}},
    "many_properties_3000": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": 4} for i in range(3000)},
        "required": [f"p{i}" for i in range(3000)], "additionalProperties": False},
    "long_pattern": {"type": "string", "pattern": "^(" + "|".join(
        f"[a-z]{{{i}}}x{i}" for i in range(1, 400)) + ")$"},
    "invalid_ref": {"$ref": "#/$defs/missing"},
    "invalid_type": {"type": "wibble"},
}


class Timings:
    """The engine's run observer: model-run and mask-fill durations."""

    def __init__(self) -> None:
        self.masks: list[float] = []  # seconds per constrained token
        self.longest = {"prefill": 0.0, "decode": 0.0, "mask": 0.0}

    def __call__(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        self.longest[kind] = max(self.longest[kind], seconds)
        if kind == "mask":
            self.masks += [seconds / rows] * rows

    def reset(self) -> None:
        self.masks.clear()
        self.longest = dict.fromkeys(self.longest, 0.0)


class Ticker:
    """The event loop's largest lag behind a 5 ms sleep."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - t0 - 0.005)


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, float, int]:
    """One streamed request: (status, decode seconds after the first token, tokens)."""
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        if resp.status_code != 200:
            return resp.status_code, 0.0, 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return 200, last - first, tokens


async def throughput(client: httpx.AsyncClient, timings: Timings, rounds: int, max_tokens: int
                     ) -> dict[str, Any]:
    base = {"model": MODEL, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}
    constrained = {**base, "response_format": {"type": "json_schema", "json_schema": {
        "name": "fruits", "schema": FRUITS, "strict": True}}}
    out: dict[str, Any] = {}
    for clients in (1, 4):
        rates: dict[str, list[float]] = {"plain": [], "schema": []}
        timings.reset()
        for _ in range(rounds):
            for name, body in (("plain", base), ("schema", constrained)):
                results: list[tuple[int, float, int]] = []

                async def one(body: dict[str, Any] = body,
                              results: list[tuple[int, float, int]] = results) -> None:
                    results.append(await _stream(client, body))

                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(clients):
                        tg.start_soon(one)
                wall = time.perf_counter() - t0
                assert all(r[0] == 200 for r in results), results
                rates[name].append(sum(r[2] - 1 for r in results) / wall if clients > 1
                                   else (results[0][2] - 1) / results[0][1])
        plain, schema = statistics.median(rates["plain"]), statistics.median(rates["schema"])
        masks = sorted(timings.masks)
        out[f"c{clients}"] = {
            "plain_tok_s": round(plain, 1), "schema_tok_s": round(schema, 1),
            "ratio": round(schema / plain, 3),
            "ratios_per_round": [round(s / p, 3) for s, p in zip(rates["schema"],
                                                                  rates["plain"], strict=True)],
            "mask_ms_p50": round(1000 * masks[len(masks) // 2], 3),
            "mask_ms_p99": round(1000 * masks[int(len(masks) * 0.99)], 3),
            "masks": len(masks)}
        print(f"c={clients}: unconstrained {plain:.1f} tok/s, JSON schema {schema:.1f} tok/s: "
              f"{schema / plain:.3f}x (rounds {out[f'c{clients}']['ratios_per_round']}); "
              f"mask per token p50 {out[f'c{clients}']['mask_ms_p50']} ms, "
              f"p99 {out[f'c{clients}']['mask_ms_p99']} ms over {len(masks)} masks",
              flush=True)
    return out


async def hostile(client: httpx.AsyncClient, timings: Timings, ticker: Ticker) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, schema in HOSTILE.items():
        timings.reset()
        ticker.worst = 0.0
        text = schema if isinstance(schema, str) else json.dumps(schema)
        head = json.dumps({"model": MODEL, "messages": [
            {"role": "user", "content": "Fill it in."}], "temperature": 0, "max_tokens": 64})
        # spliced as text: the deepest schemas are too deep for Python's own encoder
        body = (head[:-1] + ',"response_format":{"type":"json_schema","json_schema":'
                '{"name":"h","schema":' + text + "}}}")
        t0 = time.perf_counter()
        resp = await client.post("/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
        took = time.perf_counter() - t0
        answer = resp.json()
        device = max(timings.longest.values())
        out[name] = {"status": resp.status_code, "seconds": round(took, 3),
                     "body_kib": round(len(body) / 1024, 1),
                     "event_loop_stall_ms": round(1000 * ticker.worst, 1),
                     "device_stall_ms": round(1000 * device, 1),
                     "longest_mask_ms": round(1000 * timings.longest["mask"], 1)}
        if resp.status_code != 200:
            out[name]["error"] = answer["error"]["message"][:160]
        else:
            out[name]["finish"] = answer["choices"][0]["finish_reason"]
        print(f"{name}: {out[name]}", flush=True)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = ChatModel.load(Path(args.models_dir) / MODEL)
    timings = Timings()
    engine = ChatEngine(model, ChatLimits(max_running=8, max_waiting=16), on_run=timings)
    app = create_app(Settings(max_body_bytes=16 * 2**20), engines=[engine])
    ticker = Ticker()
    config = hypercorn.config.Config()
    port = _free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    stop = asyncio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))  # type: ignore
        tg.start_soon(ticker.run)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600)
        for _ in range(100):
            try:
                if (await client.get("/health/ready")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)
        # warm-up: the first grammar request builds llguidance's tokenizer
        await _stream(client, {"model": MODEL, "messages": PROMPT, "max_tokens": 8,
                               "response_format": {"type": "json_object"}})
        result = {"throughput": await throughput(client, timings, args.rounds,
                                                 args.max_tokens),
                  "hostile": await hostile(client, timings, ticker)}
        await client.aclose()
        ticker.stop = True
        stop.set()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(default_models_dir()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/structured.json"))
    args = parser.parse_args()
    result = anyio.run(main_async, args)
    worst_loop = max(h["event_loop_stall_ms"] for h in result["hostile"].values())
    worst_device = max(h["device_stall_ms"] for h in result["hostile"].values())
    print(f"hostile schemas: worst event-loop stall {worst_loop} ms, worst device-thread "
          f"stall {worst_device} ms (target: under 100 ms each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
