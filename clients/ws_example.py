"""A minimal WebSocket client for npugate: stream one chat answer, then embed two texts.

    python clients/ws_example.py [ws://127.0.0.1:8000/v1/ws]
"""

from __future__ import annotations

import json
import sys

from websockets.sync.client import connect


def main(url: str = "ws://127.0.0.1:8000/v1/ws") -> None:
    with connect(url) as ws:
        ws.send(json.dumps({"type": "chat.create", "id": "q1", "request": {
            "model": "smollm2-135m-instruct", "max_tokens": 64,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}}))
        ws.send(json.dumps({"type": "embeddings.create", "id": "e1", "request": {
            "model": "all-minilm-l6-v2", "input": ["a cat", "a kitten"]}}))
        pending = {"q1", "e1"}
        while pending:
            msg = json.loads(ws.recv())
            if msg["type"] == "chat.delta" and msg["chunk"]["choices"]:
                print(msg["chunk"]["choices"][0]["delta"].get("content", ""), end="", flush=True)
            elif msg["type"] == "chat.done":
                print(f"\n[{msg['finish_reason']}, {msg['usage']['completion_tokens']} tokens]")
                pending.discard(msg["id"])
            elif msg["type"] == "embeddings.result":
                print(f"[{len(msg['response']['data'])} embeddings]")
                pending.discard(msg["id"])
            elif msg["type"] == "error":
                print(f"\n[error: {msg['error']['message']}]")
                pending.discard(msg["id"])


if __name__ == "__main__":
    main(*sys.argv[1:])
