"""A thin OpenAI-style streaming front for OpenVINO GenAI's ContinuousBatchingPipeline, so
`benchmarks/peers.py` can measure it with the same client as npugate and llama.cpp.

Run it with the Python that has `openvino-genai` installed (not npugate's environment: it needs
only the standard library and openvino_genai):

    python benchmarks/peers_openvino.py --gguf MODEL.gguf --port 8090

The engine runs in a child process fed through a pipe: `step()` holds the GIL for a whole step
and would starve an event loop in the same process (../shared/notes/peers.md). The front
serves `POST /v1/chat/completions` with `stream: true` only, closes the connection after each
reply, and answers `GET /health` once the engine is loaded. Settings: 2 inference threads, a
2 GB KV cache, dynamic split-fuse and prefix caching, as measured in the notes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection
from typing import Any


def engine(conn: Connection, gguf: str, threads: int, cache_gb: int) -> None:
    """The child: add requests as they arrive, step while any runs, send text deltas back."""
    import openvino_genai as ov  # type: ignore[import-not-found]  # the peer's own venv

    config = ov.SchedulerConfig()
    config.cache_size = cache_gb
    config.dynamic_split_fuse = True
    config.enable_prefix_caching = True
    pipe = ov.ContinuousBatchingPipeline(gguf, config, "CPU",
                                         {"INFERENCE_NUM_THREADS": threads})
    tok = pipe.get_tokenizer()
    conn.send(("ready",))
    live: dict[int, dict[str, Any]] = {}
    while True:
        if not live:
            conn.poll(None)
        while conn.poll():
            msg = conn.recv()
            if msg[0] == "add":
                _, rid, messages, max_tokens = msg
                prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
                gen = ov.GenerationConfig()
                gen.max_new_tokens = max_tokens
                gen.do_sample = False
                handle = pipe.add_request(rid, prompt, gen)
                prompt_tokens = int(tok.encode(prompt).input_ids.get_shape()[1])
                live[rid] = {"handle": handle, "ids": [], "text": "", "prompt": prompt_tokens}
            elif msg[0] == "cancel" and msg[1] in live:
                live.pop(msg[1])["handle"].cancel()
        if not live:
            continue
        pipe.step()
        for rid in list(live):
            entry = live[rid]
            handle = entry["handle"]
            if handle.can_read():
                for out in handle.read().values():
                    entry["ids"].extend(out.generated_ids)
                text = tok.decode(entry["ids"])
                if len(text) > len(entry["text"]) and not text.endswith("\ufffd"):
                    conn.send(("delta", rid, text[len(entry["text"]):]))
                    entry["text"] = text
            if str(handle.get_status()).endswith(("FINISHED", "DROPPED_BY_HANDLE", "STOP")):
                conn.send(("done", rid, entry["prompt"], len(entry["ids"])))
                live.pop(rid)


class Front:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.queues: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self.next_id = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def listen(self) -> None:
        """A thread: hand every message from the engine to its request's queue."""
        assert self.loop is not None
        while True:
            msg = self.conn.recv()
            queue = self.queues.get(msg[1])
            if queue is not None:
                self.loop.call_soon_threadsafe(queue.put_nowait, msg)

    def send(self, msg: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(msg)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in lines[1:] if ":" in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/health":
                await self.reply(writer, 200, b'{"status":"ok"}')
            elif method == "POST" and path == "/v1/chat/completions":
                await self.chat(writer, json.loads(body))
            else:
                await self.reply(writer, 404, b'{"error":{"message":"not found"}}')
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def reply(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def chat(self, writer: asyncio.StreamWriter, req: dict[str, Any]) -> None:
        rid = self.next_id
        self.next_id += 1
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.queues[rid] = queue
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        created = int(time.time())
        self.send(("add", rid, req["messages"], int(req.get("max_tokens") or 128)))

        def event(delta: dict[str, Any], finish: str | None = None,
                  usage: dict[str, int] | None = None) -> bytes:
            chunk = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk",
                     "created": created, "model": req.get("model", "openvino"),
                     "choices": [] if usage else [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        try:
            writer.write(event({"role": "assistant", "content": ""}))
            while True:
                msg = await queue.get()
                if msg[0] == "delta":
                    writer.write(event({"content": msg[2]}))
                    await writer.drain()
                else:
                    _, _, prompt, completion = msg
                    writer.write(event({}, "length" if completion >= int(
                        req.get("max_tokens") or 128) else "stop"))
                    writer.write(event({}, usage={"prompt_tokens": prompt,
                                                  "completion_tokens": completion,
                                                  "total_tokens": prompt + completion}))
                    writer.write(b"data: [DONE]\n\n")
                    await writer.drain()
                    break
        except ConnectionError:
            self.send(("cancel", rid))
        finally:
            self.queues.pop(rid, None)


async def serve(args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=engine, args=(child, args.gguf, args.threads, args.cache_gb),
                       daemon=True)
    proc.start()
    if parent.recv()[0] != "ready":
        raise SystemExit("the engine did not start")
    front = Front(parent)
    front.loop = asyncio.get_running_loop()
    threading.Thread(target=front.listen, daemon=True).start()
    server = await asyncio.start_server(front.handle, args.host, args.port, backlog=256)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-gb", type=int, default=2)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
