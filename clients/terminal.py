"""`npugate chat`: a streamed conversation in the terminal, over the WebSocket or over SSE.

Ctrl-C while an answer streams stops that answer (chat.cancel, or closing the SSE stream) and
returns to the prompt; Ctrl-C or Ctrl-D at the prompt ends the program.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


class ChatTransport:
    """Streams one answer's text pieces; `cancel()` stops it."""

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SocketTransport(ChatTransport):
    def __init__(self, base_url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._ws: ClientConnection = connect(base_url.replace("http", "ws", 1) + "/v1/ws",
                                             additional_headers=headers)
        self._id = ""

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        self._id = uuid.uuid4().hex
        self._ws.send(json.dumps({"type": "chat.create", "id": self._id, "request": body}))
        while True:
            try:
                raw = self._ws.recv(timeout=0.2)  # short waits keep Ctrl-C responsive
            except TimeoutError:
                continue
            msg = json.loads(raw)
            if msg.get("id") != self._id:
                continue
            if msg["type"] == "chat.delta":
                choices = msg["chunk"]["choices"]
                if choices and choices[0]["delta"].get("content"):
                    yield choices[0]["delta"]["content"]
            elif msg["type"] == "chat.done":
                return
            elif msg["type"] == "error":
                raise RuntimeError(msg["error"]["message"])

    def cancel(self) -> None:
        """Cancel, then skip what is still in flight up to that conversation's end (chat.done,
        or an error if it had just finished), so the next answer starts clean."""
        self._ws.send(json.dumps({"type": "chat.cancel", "id": self._id}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                msg = json.loads(self._ws.recv(timeout=1))
            except TimeoutError:
                continue
            if msg.get("id") == self._id and msg["type"] in ("chat.done", "error"):
                return

    def close(self) -> None:
        self._ws.close()


class SSETransport(ChatTransport):
    def __init__(self, base_url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.Client(base_url=base_url, timeout=None, headers=headers)
        self._response: httpx.Response | None = None

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        with self._client.stream("POST", "/v1/chat/completions",
                                 json={**body, "stream": True}) as response:
            self._response = response
            if response.status_code != 200:
                response.read()
                raise RuntimeError(response.json()["error"]["message"])
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    yield chunk["choices"][0]["delta"]["content"]

    def cancel(self) -> None:
        if self._response is not None:
            self._response.close()  # the server sees the disconnect and stops decoding

    def close(self) -> None:
        self._client.close()


def first_chat_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    resp = httpx.get(base_url + "/v1/models", timeout=10, headers=headers)
    if resp.status_code == 401:
        raise SystemExit("npugate chat: the server wants an API key (--api-key or "
                         "NPUGATE_API_KEY)")
    models = resp.json()["data"]
    chat = [m["id"] for m in models if m.get("task", "chat") == "chat"]
    if not chat:
        raise SystemExit(f"{base_url} serves no chat model")
    return str(chat[0])


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="npugate chat", description=__doc__.split("\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    ap.add_argument("--model", help="chat model id (default: the server's first)")
    ap.add_argument("--sse", action="store_true", help="stream over SSE, not the WebSocket")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--api-key", default=os.environ.get("NPUGATE_API_KEY"),
                    help="API key, if the server requires one (NPUGATE_API_KEY)")
    args = ap.parse_args(argv)
    base = args.url.rstrip("/")
    try:
        model = args.model or first_chat_model(base, args.api_key)
        transport: ChatTransport = (SSETransport(base, args.api_key) if args.sse
                                    else SocketTransport(base, args.api_key))
    except (httpx.HTTPError, OSError) as exc:
        print(f"npugate chat: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    print(f"npugate chat: {model} at {base} over {'SSE' if args.sse else 'WebSocket'}. "
          "Ctrl-C stops an answer; Ctrl-D quits.", file=sys.stderr)
    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                prompt = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not prompt:
                continue
            history.append({"role": "user", "content": prompt})
            body = {"model": model, "messages": history, "max_tokens": args.max_tokens,
                    "temperature": args.temperature}
            answer: list[str] = []
            print("assistant> ", end="", flush=True)
            try:
                for piece in transport.stream(body):
                    answer.append(piece)
                    print(piece, end="", flush=True)
                print()
            except KeyboardInterrupt:
                transport.cancel()
                print(" [stopped]")
            except (RuntimeError, ConnectionClosed, httpx.HTTPError) as exc:
                print(f"\n[error: {exc}]")
            if answer:
                history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        transport.close()


if __name__ == "__main__":
    sys.exit(run())
