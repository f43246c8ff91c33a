"""SIGTERM while streams run: finish what fits in the grace period, end the rest cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import LiveServer

SMOL = "smollm2-135m-instruct"
# Greedy counting runs far longer than the grace period, where a story may end early.
COUNT = [{"role": "user", "content": "Write the numbers from 1 to 10000, separated by commas."}]


def _stream(base: str, max_tokens: int, out: list[str]) -> None:
    body = {"model": SMOL, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "messages": COUNT}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])


def _socket(base: str, out: list[dict[str, Any]], close_codes: list[int]) -> None:
    with connect(base.replace("http", "ws", 1) + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "chat.create", "id": "w", "request": {
            "model": SMOL, "max_tokens": 4000, "temperature": 0, "messages": COUNT}}))
        while True:
            try:
                msg = json.loads(ws.recv(timeout=60))
            except ConnectionClosed as closed:
                close_codes.append(closed.rcvd.code if closed.rcvd else -1)
                return
            out.append(msg)


def test_sigterm_drains_then_ends_streams_cleanly(smollm2_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = LiveServer(chat=[smollm2_dir], embedding=[], log=log,
                        extra=["--shutdown-grace", "4", "--log-level", "info"])
    long_sse: list[str] = []
    short_sse: list[str] = []
    ws_msgs: list[dict[str, Any]] = []
    close_codes: list[int] = []
    threads = [threading.Thread(target=_stream, args=(server.base_url, 4000, long_sse)),
               threading.Thread(target=_socket, args=(server.base_url, ws_msgs, close_codes))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(long_sse) < 10 or len(ws_msgs) < 10:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.02)
    short = threading.Thread(target=_stream, args=(server.base_url, 10, short_sse))
    short.start()
    while not short_sse:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(server.base_url + "/v1/chat/completions", timeout=10,
                         json={"model": SMOL, "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["Retry-After"]
    assert httpx.get(server.base_url + "/health/ready", timeout=10).status_code == 503

    assert server.proc.wait(timeout=20) == 0
    for t in (*threads, short):
        t.join(timeout=10)
    server.stop()

    # the short stream fitted in the grace period and ended normally
    assert short_sse[-1] == "[DONE]"
    assert json.loads(short_sse[-2])["choices"][0]["finish_reason"] == "length"
    # the long one was ended with a final error event, then [DONE]: nothing half-written
    assert long_sse[-1] == "[DONE]"
    final = json.loads(long_sse[-2])
    assert "shutting down" in final["error"]["message"]
    assert all(json.loads(x) for x in long_sse[:-1])
    # the socket conversation got its own final error
    assert ws_msgs[-1]["type"] == "error" and ws_msgs[-1]["id"] == "w"
    assert "shutting down" in ws_msgs[-1]["error"]["message"]
    assert close_codes == [1001]  # then the socket closed as "going away"
    text = log.read_text()
    assert "Traceback" not in text and "stopped" in text


def test_sigterm_closes_an_idle_socket_at_once_and_exits_in_bounded_time(
        phi3_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "server.log")
    with connect(server.base_url.replace("http", "ws", 1) + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong"}
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            ws.recv(timeout=10)
            raise AssertionError("the socket stayed open")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1001
        assert time.monotonic() - start < 2.0  # the close and the TCP close come at once
    # Hypercorn's ping task for the closed socket is cancelled at its 3 s graceful timeout.
    assert server.proc.wait(timeout=10) == 0
    assert time.monotonic() - start < 6.0
    server.stop()
