"""Faults at start-up: a missing or corrupt model is reported as failed while the rest serve."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import LiveServer


def test_corrupt_and_missing_models_fail_alone(phi3_dir: Path, minilm_dir: Path,
                                               tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt-chat"
    shutil.copytree(phi3_dir, corrupt)
    (corrupt / "model.onnx").write_bytes(b"\x00garbage")
    (corrupt / "npugate-manifest.json").unlink()
    emptied = tmp_path / "emptied-embedder"
    emptied.mkdir()
    server = LiveServer(chat=[phi3_dir, corrupt], embedding=[minilm_dir, emptied],
                        log=tmp_path / "server.log")
    try:
        health = server.health()
        assert health["status"] == "degraded"
        models = {m["id"]: m for m in health["models"]}
        assert models["corrupt-chat"]["status"] == "failed"
        assert "onnxruntime could not load" in models["corrupt-chat"]["error"]
        assert models["emptied-embedder"]["status"] == "failed"
        assert "model.onnx" in models["emptied-embedder"]["error"]
        assert models["phi3-tiny-random"]["status"] == "ready"
        assert models["all-minilm-l6-v2"]["status"] == "ready"
        assert httpx.get(server.base_url + "/health/ready").status_code == 200

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        ok = client.chat.completions.create(model="phi3-tiny-random", max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}])
        assert ok.usage is not None and ok.usage.completion_tokens == 2
        try:
            client.chat.completions.create(model="corrupt-chat", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as err:
            assert err.status_code == 503 and "failed to load" in err.message
        else:
            raise AssertionError("a failed model answered")
        listed = {m.id: m.model_extra for m in client.models.list()}
        assert [m for m, extra in listed.items() if extra and extra["loaded"]] == \
            ["phi3-tiny-random", "all-minilm-l6-v2"]
        assert listed["corrupt-chat"] == {"task": "chat", "provider": None, "loaded": False,
                                          "status": "failed"}
    finally:
        server.stop()


def _trickle(port: int, parts: list[bytes], pause: float) -> tuple[float, bytes]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(20)
    started = time.monotonic()
    try:
        for part in parts:
            sock.sendall(part)
            time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server hung up; whatever it said first is still readable
    try:
        return time.monotonic() - started, sock.recv(4096)
    except (ConnectionResetError, TimeoutError):
        return time.monotonic() - started, b""
    finally:
        sock.close()


def test_slow_clients_are_cut_off(phi3_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "server.log",
                        extra=["--body-timeout", "2", "--keep-alive-timeout", "3"])
    try:
        # headers one byte a second: the keep-alive timer (3 s here) closes the connection
        elapsed, data = _trickle(server.port, [b"P", b"O", b"S", b"T", b" "] + [b"/"] * 15, 1.0)
        assert elapsed < 7 and data == b""
        # headers complete, body trickling: 408 with the OpenAI error body after 2 s
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: 500\r\n\r\n")
        elapsed, data = _trickle(server.port, [head] + [b" "] * 6, 0.5)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert b'"code":"request_timeout"' in data
    finally:
        server.stop()


def test_huge_headers_get_431_over_a_real_socket(phi3_dir: Path, tmp_path: Path) -> None:
    # Sent in pieces, as a network delivers them: h11 used to answer 431 and close while the
    # client was still sending, so the client saw a broken pipe and no response at all.
    server = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "server.log")
    try:
        head = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                + b"a" * 100_000 + b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for i in range(0, len(head), 4096):
                sock.sendall(head[i:i + 4096])  # a broken pipe here is the bug
                time.sleep(0.001)
            data = b""
            while b"}}" not in data and (chunk := sock.recv(4096)):
                data += chunk
        assert data.startswith(b"HTTP/1.1 431"), data[:80]
        assert b"request_header_fields_too_large" in data
        # a 60 KB URL too
        resp = httpx.get(server.base_url + "/v1/models?x=" + "a" * 60_000, timeout=10)
        assert resp.status_code == 431
    finally:
        server.stop()


def _chat_stats(server: LiveServer) -> dict[str, int]:
    health = server.health()
    entry = next(m for m in health["models"] if m["task"] == "chat")
    return {**entry["stats"], "running": entry["requests_running"],
            "waiting": entry["requests_waiting"]}


def test_a_client_leaving_during_a_long_prefill_stops_it(smollm2_dir: Path,
                                                         tmp_path: Path) -> None:
    # ~6000 prompt tokens are ~100 prefill chunks (over 10 s here); the client gives up after
    # one second, streamed and not, and the server stops at its next chunk
    server = LiveServer(chat=[smollm2_dir], embedding=[], log=tmp_path / "server.log")
    long = {"model": "smollm2-135m-instruct", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Tell me a story. " * 1200}]}
    try:
        for stream in (True, False):
            before = _chat_stats(server)
            try:
                with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                                  json={**long, "stream": stream}, timeout=1.0) as resp:
                    for _ in resp.iter_lines():
                        pass
            except httpx.TimeoutException:
                pass
            deadline = time.monotonic() + 5
            while _chat_stats(server)["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            after = _chat_stats(server)
            assert after["running"] == 0 and after["waiting"] == 0, after
            assert after["cancelled_total"] == before["cancelled_total"] + 1
            assert after["prefill_runs_total"] - before["prefill_runs_total"] < 50
            # the next request does not wait behind the abandoned prompt
            started = time.monotonic()
            resp = httpx.post(server.base_url + "/v1/chat/completions", timeout=30, json={
                "model": "smollm2-135m-instruct", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200 and time.monotonic() - started < 5
    finally:
        server.stop()
