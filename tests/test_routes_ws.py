"""The /v1/ws protocol through Quart's WebSocket test client, on the real fixture models."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from quart import Quart

pytestmark = [pytest.mark.anyio,
              pytest.mark.app(settings={"ws_max_message_bytes": 4096, "ws_max_conversations": 3,
                              "max_messages": 4})]
CHAT = "phi3-tiny-random"
HELLO = [{"role": "user", "content": "hello"}]




def _chat(cid: str, max_tokens: int = 8, **extra: Any) -> str:
    return orjson.dumps({"type": "chat.create", "id": cid, "request": {
        "model": CHAT, "messages": HELLO, "max_tokens": max_tokens, "seed": 1,
        **extra}}).decode()


async def _recv(ws: Any) -> dict[str, Any]:
    with anyio.fail_after(20):
        return orjson.loads(await ws.receive())  # type: ignore[no-any-return]


async def _until_done(ws: Any, ids: set[str]) -> list[dict[str, Any]]:
    messages = []
    while ids:
        msg = await _recv(ws)
        messages.append(msg)
        if msg["type"] in ("chat.done", "error", "embeddings.result"):
            ids.discard(msg["id"])
    return messages


async def test_chat_streams_the_same_chunks_as_sse(app: Quart) -> None:
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(_chat("a", max_tokens=6))
        messages = await _until_done(ws, {"a"})
    deltas = [m for m in messages if m["type"] == "chat.delta"]
    assert deltas[0]["chunk"]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(m["id"] == "a" and m["chunk"]["object"] == "chat.completion.chunk"
               for m in deltas)
    assert deltas[-1]["chunk"]["choices"][0]["finish_reason"] == "length"
    done = messages[-1]
    assert done == {"type": "chat.done", "id": "a", "finish_reason": "length",
                    "usage": done["usage"]}
    assert done["usage"]["completion_tokens"] == 6


async def test_conversations_multiplex_and_cancel_independently(app: Quart) -> None:
    engine = app.extensions["npugate"].registry.entries[CHAT].chat
    cancelled_before = engine.stats.cancelled_total
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(_chat("long", max_tokens=3000))
        await ws.send(_chat("short", max_tokens=30))
        seen: list[str] = []
        while len(set(seen)) < 2 or seen.count("long") < 3:
            msg = await _recv(ws)
            seen.append(msg["id"])
        await ws.send(orjson.dumps({"type": "chat.cancel", "id": "long"}).decode())
        messages = await _until_done(ws, {"long", "short"})
    done = {m["id"]: m for m in messages if m["type"] == "chat.done"}
    assert done["long"]["finish_reason"] == "cancelled"
    assert done["long"]["usage"]["completion_tokens"] < 3000
    assert done["short"]["finish_reason"] == "length"
    assert done["short"]["usage"]["completion_tokens"] == 30
    assert engine.stats.cancelled_total == cancelled_before + 1


async def test_embeddings_over_the_socket(app: Quart) -> None:
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(orjson.dumps({"type": "embeddings.create", "id": "e1", "request": {
            "model": "bert-tiny-cls-random", "input": ["a", "b"]}}).decode())
        msg = await _recv(ws)
    assert msg["type"] == "embeddings.result" and msg["id"] == "e1"
    assert len(msg["response"]["data"]) == 2 and msg["response"]["object"] == "list"


@pytest.mark.parametrize(("raw", "cid", "fragment"), [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ('{"type": "chat.teleport", "id": "x"}', "x", "unknown message type"),
    ('{"type": "chat.create"}', None, "id must be"),
    ('{"type": "chat.create", "id": 7, "request": {}}', None, "id must be"),
    ('{"type": "chat.create", "id": "x", "request": "hi"}', "x", "request must be"),
    ('{"type": "chat.create", "id": "x", "request": {"model": "nope", "messages": []}}', "x",
     "messages"),
    ('{"type": "chat.create", "id": "x", "request": {"model": "nope", '
     '"messages": [{"role": "user", "content": "hi"}]}}', "x", "does not exist"),
    ('{"type": "chat.cancel", "id": "ghost"}', "ghost", "no active conversation"),
    ('{"type": "embeddings.create", "id": "x", "request": {"model": "bert-tiny-cls-random", '
     '"input": ""}}', "x", "empty"),
    ('{"type": "chat.create", "id": "x", "request": {"pad": "' + "x" * 5000 + '"}}', None,
     "exceeds the limit"),
    (_chat("x", messages=HELLO * 5), "x", "at most 4 per request"),
])
async def test_bad_messages_get_an_error_and_the_socket_stays_open(
        app: Quart, raw: str, cid: str | None, fragment: str) -> None:
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(raw)
        msg = await _recv(ws)
        assert msg["type"] == "error" and msg["id"] == cid, msg
        assert fragment in msg["error"]["message"]
        assert set(msg["error"]) == {"message", "type", "param", "code"}
        await ws.send('{"type": "ping"}')
        assert await _recv(ws) == {"type": "pong"}


async def test_duplicate_ids_and_conversation_limit(app: Quart) -> None:
    async with app.test_client().websocket("/v1/ws") as ws:
        for cid in ("a", "b", "c"):
            await ws.send(_chat(cid, max_tokens=2000))
        await ws.send(_chat("a"))
        await ws.send(_chat("d"))
        errors = []
        while len(errors) < 2:
            msg = await _recv(ws)
            if msg["type"] == "error":
                errors.append(msg)
        assert "already in use" in errors[0]["error"]["message"]
        assert errors[1]["error"]["code"] == "too_many_conversations"


async def test_closing_the_socket_stops_every_conversation(app: Quart) -> None:
    engine = app.extensions["npugate"].registry.entries[CHAT].chat
    before = engine.stats.cancelled_total
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(_chat("a", max_tokens=3000))
        await ws.send(_chat("b", max_tokens=3000))
        for _ in range(6):
            await _recv(ws)
    with anyio.fail_after(10):
        while engine.stats.cancelled_total < before + 2:  # noqa: ASYNC110 - observing
            await anyio.sleep(0.02)
    assert engine.running == 0


async def test_tiny_temperature_over_the_socket_is_no_error(app: Quart) -> None:
    async with app.test_client().websocket("/v1/ws") as ws:
        await ws.send(_chat("t", max_tokens=4, temperature=1e-310))
        messages = await _until_done(ws, {"t"})
    assert messages[-1]["type"] == "chat.done" and messages[-1]["finish_reason"] == "length"


async def test_a_cancel_right_after_create_always_gets_its_closing_message(app: Quart) -> None:
    # sent before the request is tokenized or queued, and once it is: every try is answered
    async with app.test_client().websocket("/v1/ws") as ws:
        for i in range(10):
            cid = f"c{i}"
            await ws.send(_chat(cid, max_tokens=200))
            await ws.send(orjson.dumps({"type": "chat.cancel", "id": cid}).decode())
            messages = await _until_done(ws, {cid})
            done = messages[-1]
            assert done["type"] == "chat.done" and done["finish_reason"] == "cancelled", done
            assert set(done["usage"]) >= {"prompt_tokens", "completion_tokens"}
