"""Models that load and unload while serving: on demand, after a keep-alive, under a memory
budget, by admin request; in-flight requests finishing first; failures staying contained."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer

CHAT = "phi3-tiny-random"
EMB = "bert-tiny-cls-random"
ADMIN = "admin-secret"


def _place(src: Path, served_dir: Path, model_id: str | None = None) -> Path:
    """A prepared model folder in `served_dir`, as `npugate prepare` leaves it (hard links
    where the file system allows: the weights are not copied)."""
    dest = served_dir / (model_id or src.name)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link, ignore=shutil.ignore_patterns(
        "npugate-manifest.json"))
    manifest = json.loads((src / "npugate-manifest.json").read_text())
    if model_id:
        manifest["id"] = model_id
    (dest / "npugate-manifest.json").write_text(json.dumps(manifest))  # written last
    return dest


def _models(server: LiveServer) -> dict[str, dict[str, Any]]:
    data = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m for m in data}


def _wait_status(server: LiveServer, model: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _models(server)[model]["status"] == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{model} never became {status}: {_models(server)[model]}")


def _chat(server: LiveServer, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        **extra})


def _embed(server: LiveServer, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", timeout=60,
                      json={"model": model, "input": "hello there", **extra})


@pytest.fixture(scope="module")
def served_dir(phi3_dir: Path, bert_tiny_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _place(phi3_dir, root)
    _place(bert_tiny_dir, root)
    broken = root / "broken-embedder"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    (broken / "npugate-manifest.json").write_text(json.dumps(
        {"id": "broken-embedder", "task": "embedding"}))
    return root


@pytest.fixture(scope="module")
def server(served_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[LiveServer]:
    keys = tmp_path_factory.mktemp("keys") / "admin"
    keys.write_text(ADMIN + "\n")
    live = LiveServer(chat=[served_dir / CHAT], embedding=[],
                      log=tmp_path_factory.mktemp("server") / "server.log",
                      extra=["--models-dir", str(served_dir), "--keep-alive", "-1",
                             "--admin-key-file", str(keys)])
    yield live
    live.stop()


def test_a_prepared_model_loads_when_a_request_names_it(server: LiveServer) -> None:
    listed = _models(server)
    assert listed[CHAT]["loaded"] is True
    assert listed[EMB]["loaded"] is False and listed[EMB]["task"] == "embedding"
    resp = _embed(server, EMB)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"][0]["embedding"]) > 0
    assert _models(server)[EMB]["loaded"] is True


def test_a_model_prepared_while_serving_is_usable_at_once(server: LiveServer, phi3_dir: Path,
                                                          served_dir: Path) -> None:
    assert "phi3-late" not in _models(server)
    _place(phi3_dir, served_dir, "phi3-late")
    assert _models(server)["phi3-late"]["loaded"] is False
    resp = _chat(server, "phi3-late")
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4


def test_idle_models_unload_after_their_keep_alive(server: LiveServer, phi3_dir: Path,
                                                   served_dir: Path) -> None:
    _place(phi3_dir, served_dir, "phi3-idle")
    assert _chat(server, "phi3-idle", keep_alive=0).status_code == 200
    _wait_status(server, "phi3-idle", "unloaded")  # keep_alive 0: right after the request
    assert _chat(server, "phi3-idle", keep_alive="1s").status_code == 200  # loads again
    assert _models(server)["phi3-idle"]["loaded"] is True
    _wait_status(server, "phi3-idle", "unloaded", timeout=10)
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ready"  # an unloaded model is still servable
    bad = _chat(server, "phi3-idle", keep_alive="soon")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_unloading_waits_for_in_flight_requests(server: LiveServer, phi3_dir: Path,
                                                served_dir: Path) -> None:
    _place(phi3_dir, served_dir, "phi3-busy")
    pieces, finish = [], None
    unloaded: dict[str, Any] = {}
    later: list[httpx.Response] = []

    def unload() -> None:
        resp = httpx.post(server.base_url + "/v1/admin/models/phi3-busy/unload", timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN}"})
        unloaded.update(status=resp.status_code, body=resp.json(), at=time.monotonic())

    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "phi3-busy", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400, "temperature": 0, "stream": True}) as resp:
        lines = resp.iter_lines()
        thread = None
        for line in lines:
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
            if thread is None:  # the stream has begun: ask for the unload now
                thread = threading.Thread(target=unload)
                thread.start()
                time.sleep(0.2)
                # and a request arriving during the unload waits for it, then loads again
                late = threading.Thread(target=lambda: later.append(_chat(server,
                                                                          "phi3-busy")))
                late.start()
        ended = time.monotonic()
    assert thread is not None
    thread.join(30)
    assert finish == "length"  # the stream ran to its end
    assert unloaded["status"] == 200 and unloaded["body"]["status"] == "unloaded"
    assert unloaded["at"] >= ended - 0.5  # and the unload finished after it
    late.join(60)
    assert later and later[0].status_code == 200, later  # it loaded again on demand
    assert _chat(server, "phi3-busy").status_code == 200


def test_admin_endpoints_need_the_admin_key(server: LiveServer) -> None:
    url = server.base_url + f"/v1/admin/models/{EMB}/load"
    assert httpx.post(url).status_code == 401
    wrong = httpx.post(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["loaded"] is True
    gone = httpx.post(server.base_url + "/v1/admin/models/nope/load",
                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert gone.status_code == 404


def test_a_model_that_fails_to_load_leaves_the_others_serving(server: LiveServer) -> None:
    resp = _embed(server, "broken-embedder")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_failed"
    assert _models(server)["broken-embedder"]["status"] == "failed"
    assert "/" not in resp.json()["error"]["message"]  # no server paths to callers
    assert _chat(server, CHAT).status_code == 200
    assert _embed(server, EMB).status_code == 200
    assert httpx.get(server.base_url + "/health").json()["status"] == "degraded"


def test_memory_budget_and_load_timeout(served_dir: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A budget that holds phi3 (expected 1.5 x 9.4 + 32 = 46 MiB) or bert-tiny (1.5 x 3.8 +
    32 = 38 MiB) but not both:
    each load unloads the other, idle. A load slower than --load-timeout answers 503 with
    Retry-After while it goes on."""
    live = LiveServer(chat=[served_dir / CHAT], embedding=[],
                      log=tmp_path_factory.mktemp("budget") / "server.log",
                      extra=["--models-dir", str(served_dir), "--keep-alive", "-1",
                             "--memory-budget", "60", "--load-timeout", "0.001"])
    try:
        slow = _embed(live, EMB)
        assert slow.status_code == 503 and slow.headers["Retry-After"]
        assert slow.json()["error"]["code"] == "model_loading"
        _wait_status(live, EMB, "ready")
        assert _models(live)[CHAT]["loaded"] is False  # unloaded to make room
        assert _embed(live, EMB).status_code == 200
        _chat(live, CHAT)  # starts loading phi3 again, which unloads bert-tiny
        _wait_status(live, CHAT, "ready")
        assert _models(live)[EMB]["loaded"] is False
    finally:
        live.stop()


@pytest.mark.anyio
async def test_admin_endpoints_are_off_without_admin_keys(phi3_dir: Path) -> None:
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(chat_models=(phi3_dir,), models_dir=phi3_dir.parent))
    async with app.test_app():
        resp = await app.test_client().post(f"/v1/admin/models/{CHAT}/unload")
        assert resp.status_code == 403
        assert (await resp.get_json())["error"]["code"] == "admin_disabled"


@pytest.mark.anyio
async def test_an_engine_handed_over_loaded_cannot_be_unloaded(phi3: Any) -> None:
    from server.settings import Settings
    from tests.conftest import serving

    async with serving(Settings(admin_keys=(ADMIN,), max_running_per_model=2),
                       chat=[phi3]) as app:
        resp = await app.test_client().post(f"/v1/admin/models/{CHAT}/unload",
                                            headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status_code == 400
        assert (await resp.get_json())["error"]["code"] == "model_pinned"
