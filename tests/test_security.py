"""API keys, CORS, WebSocket origin and auth, request ids, probes, static-file confinement."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from quart import Quart

from inference.chat.model import ChatModel
from inference.embed.model import EmbeddingModel
from server.core.security import OPEN_SCOPE, APIKeys
from server.core.tenant import OPEN
from server.settings import Settings
from tests.conftest import serving

pytestmark = pytest.mark.anyio
KEY = "sk-test-0123456789"
BODY = {"model": "phi3-tiny-random", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2}


@pytest.fixture
async def locked(phi3: ChatModel) -> AsyncIterator[Quart]:
    async with serving(Settings(api_keys=(KEY, "sk-other"),
                                cors_origins=("https://app.example",)), chat=[phi3]) as app:
        yield app


def test_key_check_is_exact() -> None:
    keys = APIKeys(["a-key", "b-key"])
    assert keys.check("a-key") and keys.check("b-key")
    assert not keys.check("a-ke") and not keys.check("") and not keys.check(None)
    assert keys.check_header("Bearer b-key") and keys.check_header("bearer  a-key")
    assert not keys.check_header("Basic a-key") and not keys.check_header(None)
    assert APIKeys([]).check(None)


async def test_no_keys_means_open(phi3: ChatModel) -> None:
    async with serving(Settings(), chat=[phi3]) as app:
        resp = await app.test_client().post("/v1/chat/completions", json=BODY)
        assert resp.status_code == 200


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
    ({"Authorization": KEY}, "Incorrect API key"),
])
async def test_missing_or_wrong_key_is_401(locked: Quart, headers: dict[str, str],
                                           message: str, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    caplog.set_level(logging.DEBUG)
    client = locked.test_client()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("POST", "/v1/embeddings")):
        resp = await client.open(path, method=method, json=BODY, headers=headers)
        body = await resp.get_json()
        assert resp.status_code == 401, (path, body)
        assert body["error"]["code"] == "invalid_api_key" and message in body["error"]["message"]
    assert KEY not in caplog.text and "wrong" not in caplog.text  # keys never logged


async def test_right_key_passes_and_health_is_open_by_default(locked: Quart) -> None:
    client = locked.test_client()
    resp = await client.post("/v1/chat/completions", json=BODY,
                             headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200
    for path in ("/health", "/health/live", "/health/ready", "/", "/static/app.js"):
        assert (await client.get(path)).status_code == 200, path


async def test_health_can_be_protected(phi3: ChatModel) -> None:
    async with serving(Settings(api_keys=(KEY,), protect_health=True), chat=[phi3]) as app:
        client = app.test_client()
        assert (await client.get("/health/ready")).status_code == 401
        resp = await client.get("/health/ready", headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status_code == 200


async def test_cors_allowlist(locked: Quart) -> None:
    client = locked.test_client()
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = await client.get("/v1/models", headers={**auth, "Origin": "https://app.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = await client.get("/v1/models", headers={**auth, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    pre = await client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert (await client.options("/v1/chat/completions",
                                 headers={"Origin": "https://evil.example"})).status_code == 403


async def test_request_ids(locked: Quart) -> None:
    client = locked.test_client()
    resp = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    generated = (await client.get("/health")).headers["X-Request-Id"]
    assert len(generated) == 32
    odd = await client.get("/health", headers={"X-Request-Id": "x" * 500})
    assert odd.headers["X-Request-Id"] != "x" * 500
    failed = await client.get("/v1/models")
    assert failed.status_code == 401 and failed.headers["X-Request-Id"]


async def _ws_messages(ws: Any, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(await ws.receive()) for _ in range(n)]


async def test_socket_auth_by_first_message(locked: Quart) -> None:
    async with locked.test_client().websocket("/v1/ws") as ws:
        await ws.send(orjson.dumps({"type": "auth", "api_key": KEY}).decode())
        assert await _ws_messages(ws, 1) == [{"type": "auth.ok"}]
        await ws.send('{"type": "ping"}')
        assert await _ws_messages(ws, 1) == [{"type": "pong"}]


async def test_socket_auth_by_header(locked: Quart) -> None:
    async with locked.test_client().websocket(
            "/v1/ws", headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send('{"type": "ping"}')
        assert await _ws_messages(ws, 1) == [{"type": "pong"}]


@pytest.mark.parametrize("first", [
    '{"type": "auth", "api_key": "wrong"}',
    '{"type": "chat.create", "id": "a", "request": {}}',
    "not json",
])
async def test_socket_without_a_good_key_is_closed_1008(locked: Quart, first: str) -> None:
    from quart.testing.connections import WebsocketDisconnectError

    async with locked.test_client().websocket("/v1/ws") as ws:
        await ws.send(first)
        msg = orjson.loads(await ws.receive())
        assert msg["type"] == "error" and msg["error"]["code"] == "invalid_api_key"
        with pytest.raises(WebsocketDisconnectError) as closed:
            await ws.receive()
        assert closed.value.args[0] == 1008


async def test_socket_refuses_foreign_origins(locked: Quart) -> None:
    from quart.testing.connections import WebsocketResponseError

    with pytest.raises(WebsocketResponseError) as refused:
        async with locked.test_client().websocket(
                "/v1/ws", headers={"Origin": "https://evil.example",
                                   "Authorization": f"Bearer {KEY}"}) as ws:
            await ws.send('{"type": "ping"}')
    assert refused.value.response.status_code == 403


async def test_static_files_cannot_escape(locked: Quart) -> None:
    client = locked.test_client()
    for path in ("/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
                 "/static/..%2f..%2fserver%2fapp.py", "/static//etc/passwd"):
        resp = await client.get(path)
        if resp.status_code == 308:  # "//" is merged by a redirect that stays in /static/
            assert resp.headers["Location"].endswith("/static/etc/passwd")
            resp = await client.get("/static/etc/passwd")
        assert resp.status_code == 404, path
        assert b"[project]" not in await resp.get_data()


# --- what an attack run found (browser drive-by, DNS rebinding, re-auth, huge headers) ---

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
async def test_non_json_bodies_are_refused_415(phi3: ChatModel, content_type: str | None
                                               ) -> None:
    # the bodies a foreign page can POST without a CORS preflight
    async with serving(Settings(), chat=[phi3]) as app:
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await app.test_client().post("/v1/chat/completions", headers=headers,
                                            data=orjson.dumps(BODY))
        body = await resp.get_json()
        assert resp.status_code == 415 and body["error"]["code"] == "unsupported_media_type"
        ok = await app.test_client().post("/v1/chat/completions", data=orjson.dumps(BODY),
                                          headers={"Content-Type":
                                                   "application/json; charset=utf-8"})
        assert ok.status_code == 200


async def test_foreign_origins_are_refused_on_every_api_request(locked: Quart) -> None:
    client = locked.test_client()
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
                         ("GET", "/v1/models"), ("GET", "/health")):
        resp = await client.open(path, method=method, json=BODY,
                                 headers={**auth, "Origin": "https://evil.example"})
        body = await resp.get_json()
        assert resp.status_code == 403 and body["error"]["code"] == "origin_not_allowed", path
    same = await client.post("/v1/chat/completions", json=BODY,
                             headers={**auth, "Origin": "http://localhost"})
    allowed = await client.post("/v1/chat/completions", json=BODY,
                                headers={**auth, "Origin": "https://app.example"})
    assert same.status_code == 200 and allowed.status_code == 200
    # the chat page itself stays reachable from anywhere (it is static)
    assert (await client.get("/", headers={"Origin": "https://evil.example"})).status_code == 200


async def test_unknown_host_names_are_refused_on_loopback(phi3: ChatModel) -> None:
    from quart.testing.connections import WebsocketResponseError

    async with serving(Settings(allowed_hosts=("npugate.lan",)), chat=[phi3]) as app:
        client = app.test_client()
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "127.0.0.2",
                     "npugate.lan:8000"):
            resp = await client.post("/v1/chat/completions", json=BODY, headers={"Host": host})
            assert resp.status_code == 200, host
        for host in ("evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
            resp = await client.post("/v1/chat/completions", json=BODY, headers={"Host": host})
            body = await resp.get_json()
            assert resp.status_code == 403 and body["error"]["code"] == "host_not_allowed"
        with pytest.raises(WebsocketResponseError) as refused:
            async with client.websocket("/v1/ws", headers={"Host": "evil.example"}) as ws:
                await ws.send('{"type": "ping"}')
        assert refused.value.response.status_code == 403
    # bound to every address, the server is meant to be reached by any name
    async with serving(Settings(host="0.0.0.0"), chat=[phi3]) as app:
        resp = await app.test_client().post("/v1/chat/completions", json=BODY,
                                            headers={"Host": "gpu-box.example"})
        assert resp.status_code == 200


async def test_socket_reauthentication_with_a_wrong_key_closes_1008(locked: Quart) -> None:
    from quart.testing.connections import WebsocketDisconnectError

    async with locked.test_client().websocket(
            "/v1/ws", headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(orjson.dumps({"type": "auth", "api_key": "sk-other"}).decode())
        assert await _ws_messages(ws, 1) == [{"type": "auth.ok"}]  # a right key: ok
        await ws.send(orjson.dumps({"type": "auth", "api_key": "wrong"}).decode())
        msg = orjson.loads(await ws.receive())
        assert msg["type"] == "error" and msg["error"]["code"] == "invalid_api_key"
        with pytest.raises(WebsocketDisconnectError) as closed:
            await ws.receive()
        assert closed.value.args[0] == 1008


async def test_oversized_headers_get_431(locked: Quart) -> None:
    resp = await locked.test_client().get(
        "/v1/models", headers={"Authorization": "Bearer " + "a" * 100_000})
    body = await resp.get_json()
    assert resp.status_code == 431
    assert body["error"]["code"] == "request_header_fields_too_large"


# --- caches scoped to the key (CVE-2025-46570's side channel, closed on the server's side) --

LONG = {"model": "phi3-tiny-random", "max_tokens": 1,
        "messages": [{"role": "user", "content": "lighthouse keeper " * 80}]}  # > 2 chunks


async def _cached_tokens(client: Any, key: str) -> int:
    resp = await client.post("/v1/chat/completions", json=LONG,
                             headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    return int((await resp.get_json())["usage"]["prompt_tokens_details"]["cached_tokens"])


async def _embedding_hits(client: Any, key: str) -> float:
    text = (await (await client.get("/metrics", headers={"Authorization": f"Bearer {key}"}))
            .get_data(as_text=True))
    line = next(ln for ln in text.splitlines()
                if ln.startswith("npugate_embedding_cache_hits_total"))
    return float(line.split()[-1])


async def test_two_keys_never_share_a_cache_hit(phi3: ChatModel, minilm: EmbeddingModel
                                                ) -> None:
    async with serving(Settings(api_keys=(KEY, "sk-other"), embedding_cache_mib=1),
                       chat=[phi3], embedding=[minilm]) as app:
        client = app.test_client()
        assert await _cached_tokens(client, KEY) == 0
        own = await _cached_tokens(client, KEY)
        assert own >= 128  # the key hits its own prompt
        assert await _cached_tokens(client, "sk-other") == 0  # the same prompt, another key
        assert await _cached_tokens(client, KEY) == own  # A's entry is still A's
        embed = {"model": "all-minilm-l6-v2", "input": "a secret sentence"}
        for key, hits in ((KEY, 0), (KEY, 1), ("sk-other", 1), ("sk-other", 2)):
            resp = await client.post("/v1/embeddings", json=embed,
                                     headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200
            assert await _embedding_hits(client, KEY) == hits, key


async def test_metrics_take_a_key_when_keys_are_configured(locked: Quart) -> None:
    client = locked.test_client()
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/health")).status_code == 200  # probes stay open by default
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200


def test_a_scope_is_a_hash_of_the_key_never_the_key() -> None:
    keys = APIKeys([KEY, "sk-other"])
    mine, theirs = keys.tenant(KEY), keys.tenant("sk-other")
    assert mine and theirs and mine.scope != theirs.scope and KEY not in mine.scope
    assert keys.check_header(f"Bearer {KEY}") and keys.tenant("wrong") is None
    assert not keys.check_header(f"Basic {KEY}")
    assert APIKeys([]).tenant(None) == APIKeys([]).tenant("anything") == OPEN
    assert OPEN.scope == OPEN_SCOPE


async def _socket_cached_tokens(app: Quart, key: str) -> int:
    request = dict(LONG)
    async with app.test_client().websocket("/v1/ws") as ws:  # a browser: key in a message
        await ws.send(orjson.dumps({"type": "auth", "api_key": key}).decode())
        await ws.send(orjson.dumps({"type": "chat.create", "id": "c", "request": request}))
        while True:
            message = orjson.loads(await ws.receive())
            if message["type"] == "chat.done":
                return int(message["usage"]["prompt_tokens_details"]["cached_tokens"])
            assert message["type"] in ("auth.ok", "chat.delta"), message


async def test_socket_conversations_use_their_key_s_cache(phi3: ChatModel) -> None:
    async with serving(Settings(api_keys=(KEY, "sk-other")), chat=[phi3]) as app:
        assert await _socket_cached_tokens(app, KEY) == 0
        assert await _socket_cached_tokens(app, KEY) >= 128
        assert await _socket_cached_tokens(app, "sk-other") == 0


async def test_an_unknown_path_is_404_whatever_the_body(locked: Quart) -> None:
    resp = await locked.test_client().post("/v1/nope", data="not json",
                                           headers={"Authorization": f"Bearer {KEY}",
                                                    "Content-Type": "text/plain"})
    assert resp.status_code == 404
    assert (await resp.get_json())["error"]["code"] == "not_found"


async def test_the_chat_page_asks_for_no_favicon(locked: Quart) -> None:
    page = await (await locked.test_client().get("/")).get_data(as_text=True)
    assert '<link rel="icon" href="data:,">' in page  # browsers then request none


def test_key_options() -> None:
    keys = APIKeys(["sk-a scope=team", "sk-b  scope=team name=bee weight=2", "sk-c", ""])
    a, b, c = (keys.tenant(k) for k in ("sk-a", "sk-b", "sk-c"))
    assert a and b and c and a.scope == b.scope != c.scope
    assert (a.name, b.name, c.name) == ("team", "bee", "key-3")
    assert (a.weight, b.weight) == (1.0, 2.0)
    assert keys.tenant("sk-a scope=team") is None and keys.tenant("team") is None
    for bad in ("sk-d scope=", "sk-d team=x", "sk-d weight=0", "sk-d weight=x"):
        with pytest.raises(ValueError, match="scope=NAME"):
            APIKeys([bad])


LIMITED = {"api_keys": ("sk-chat models=phi3-tiny-random", "sk-all")}


@pytest.mark.anyio
@pytest.mark.app(settings=LIMITED)
async def test_a_key_limited_to_some_models(app: Quart) -> None:
    """`models=` limits a key: any other model is 403 naming it, on every surface, and the
    model list shows only its models."""
    client = app.test_client()
    limited = {"Authorization": "Bearer sk-chat"}
    chat = {"model": "phi3-tiny-random", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat, headers=limited)
            ).status_code == 200
    for path, body in (("/v1/embeddings", {"model": "bert-tiny-cls-random", "input": "hi"}),
                       ("/v1/chat/completions", {**chat, "model": "no-such-model"})):
        resp = await client.post(path, json=body, headers=limited)
        error = (await resp.get_json())["error"]
        assert resp.status_code == 403 and error["code"] == "model_not_allowed"
        assert body["model"] in error["message"] and error["param"] == "model"
    listed = await (await client.get("/v1/models", headers=limited)).get_json()
    assert [m["id"] for m in listed["data"]] == ["phi3-tiny-random"]
    assert (await client.get("/v1/models/bert-tiny-cls-random", headers=limited)
            ).status_code == 403
    anthropic = await client.post("/v1/messages", headers={"x-api-key": "sk-chat"}, json={
        "model": "bert-tiny-cls-random", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 403
    assert (await anthropic.get_json())["error"]["type"] == "permission_error"
    everything = await (await client.get("/v1/models", headers={
        "Authorization": "Bearer sk-all"})).get_json()
    assert len(everything["data"]) == 2
