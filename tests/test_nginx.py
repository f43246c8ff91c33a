"""Two replicas behind nginx (Debian's package) on loopback: SSE streams unbuffered and
WebSockets upgrade through it, and both replicas take work. Skips where nginx is absent,
except in CI (NPUGATE_REQUIRE_NGINX=1), where it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import REPO, LiveServer, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CHAT = "smollm2-135m-instruct"


def require_nginx(variable: str = "NPUGATE_REQUIRE_NGINX") -> str:
    """nginx's path; a skip where it is absent, a failure where `variable` is 1 (CI)."""
    if NGINX is None:
        if os.environ.get(variable) == "1":
            pytest.fail("no nginx (apt-get install nginx-light)")
        pytest.skip("no nginx (apt-get install nginx-light)")
    return NGINX


@contextmanager
def nginx_in_front(replicas: list[LiveServer], prefix: Path) -> Iterator[str]:
    """docs/nginx.conf in front of `replicas`, run from `prefix`: its base URL."""
    nginx = require_nginx()
    port = free_port()
    conf = (REPO / "docs" / "nginx.conf").read_text()
    conf = (conf.replace("@LISTEN@", f"127.0.0.1:{port}").replace("@PREFIX@", str(prefix))
            .replace("@UPSTREAMS@", " ".join(f"server 127.0.0.1:{r.port};" for r in replicas)))
    (prefix / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture(scope="module")
def replicas_behind_nginx(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[tuple[str, list[LiveServer]]]:
    require_nginx()
    prefix = tmp_path_factory.mktemp("nginx")
    replicas = [LiveServer(chat=[smollm2_dir], embedding=[], log=prefix / f"replica{i}.log")
                for i in range(2)]
    try:
        with nginx_in_front(replicas, prefix) as base:
            yield base, replicas
    finally:
        for r in replicas:
            r.stop()


@pytest.fixture(scope="module")
def proxy(replicas_behind_nginx: tuple[str, list[LiveServer]]) -> str:
    return replicas_behind_nginx[0]


def test_sse_streams_through_nginx_unbuffered(proxy: str) -> None:
    body = {"model": CHAT, "stream": True, "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 100."}]}
    arrivals: list[float] = []
    with httpx.stream("POST", proxy + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) > 20
    # events arrive spread over the generation, not in one buffered burst at the end
    spread = arrivals[-2] - arrivals[1]
    assert spread > 0.2, spread
    gaps = [b - a for a, b in zip(arrivals[1:-2], arrivals[2:-1], strict=False)]
    assert sorted(gaps)[len(gaps) // 2] > 0.002


def test_websocket_upgrades_through_nginx(proxy: str) -> None:
    with connect(proxy.replace("http", "ws", 1) + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "chat.create", "id": "n", "request": {
            "model": CHAT, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hi."}]}}))
        kinds = []
        while not kinds or kinds[-1] not in ("chat.done", "error"):
            kinds.append(json.loads(ws.recv(timeout=30))["type"])
    assert kinds[0] == "chat.delta" and kinds[-1] == "chat.done"


def test_both_replicas_take_work(replicas_behind_nginx: tuple[str, list[LiveServer]]
                                 ) -> None:
    base, replicas = replicas_behind_nginx

    def handled(replica: LiveServer) -> int:
        return int(replica.health()["models"][0]["stats"]["requests_total"])

    before = [handled(r) for r in replicas]
    rids = set()
    for _ in range(6):
        resp = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200
        rids.add(resp.headers["X-Request-Id"])
    assert len(rids) == 6  # nginx's $request_id reached the replica and came back
    after = [handled(r) for r in replicas]
    assert sum(after) - sum(before) == 6
    assert all(a > b for a, b in zip(after, before, strict=True))  # both took work
