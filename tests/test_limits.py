"""Limits and hostile input over HTTP: every case is a 4xx with the OpenAI error body."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from quart import Quart

pytestmark = [pytest.mark.anyio,
              pytest.mark.app(settings={"max_messages": 4, "max_tokens_limit": 64,
                              "max_body_bytes": 256 * 1024, "max_running_per_model": 1,
                              "max_waiting_per_model": 1})]
CHAT = "phi3-tiny-random"
HELLO = [{"role": "user", "content": "hello"}]




def _check_error(status: int, body: Any, want: int) -> None:
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_message_and_token_limits(app: Quart) -> None:
    client = app.test_client()
    resp = await client.post("/v1/chat/completions", json={"model": CHAT,
                                                           "messages": HELLO * 5})
    _check_error(resp.status_code, await resp.get_json(), 413)
    assert (await resp.get_json())["error"]["code"] == "too_many_messages"
    # counted before the messages are validated (validation costs event-loop time each)
    resp = await client.post("/v1/chat/completions", json={"model": CHAT,
                                                           "messages": [{"role": 1}] * 5})
    assert (await resp.get_json())["error"]["code"] == "too_many_messages"
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}] * 3}] * 2
    resp = await client.post("/v1/chat/completions", json={"model": CHAT, "messages": parts})
    _check_error(resp.status_code, await resp.get_json(), 413)
    assert (await resp.get_json())["error"]["code"] == "too_many_content_parts"
    # more bytes than the context could hold at the longest token's size: refused untokenized
    engine = app.extensions["npugate"].registry.entries[CHAT].chat
    size = engine.model.spec.context_length * engine.model.max_token_bytes + 1
    resp = await client.post("/v1/chat/completions", json={"model": CHAT, "messages": [
        {"role": "user", "content": "x" * size}]})
    _check_error(resp.status_code, await resp.get_json(), 400)
    assert "bytes, more than that many tokens can hold" in (await resp.get_json())["error"][
        "message"]
    resp = await client.post("/v1/chat/completions", json={"model": CHAT, "messages": HELLO,
                                                           "max_tokens": 65})
    assert (await resp.get_json())["error"]["code"] == "max_tokens_too_large"
    resp = await client.post("/v1/chat/completions", json={"model": CHAT, "messages": HELLO,
                                                           "temperature": 0})
    body = await resp.get_json()  # no max_tokens: bounded by the server's limit
    assert body["usage"]["completion_tokens"] <= 64


async def test_full_queue_is_429_with_retry_after(app: Quart,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client = app.test_client()
    long = {"model": CHAT, "messages": HELLO, "max_tokens": 64, "stream": True}
    engine = app.extensions["npugate"].registry.entries[CHAT].chat
    # The tiny model decodes 64 tokens in milliseconds: hold the running one at its first
    # step so that the next one has to wait.
    gate = threading.Event()
    decode = engine.model.prepare_decode

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.model, "prepare_decode", held)

    async def post() -> None:
        await client.post("/v1/chat/completions", json=long)

    with anyio.fail_after(30):  # models start in the background
        while (await client.get("/health/ready")).status_code != 200:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post)
            tg.start_soon(post)
            with anyio.fail_after(10):
                while engine.running < 1 or engine.waiting < 1:  # noqa: ASYNC110 - observing
                    await anyio.sleep(0.005)
            resp = await client.post("/v1/chat/completions", json=long)
            _check_error(resp.status_code, await resp.get_json(), 429)
            assert int(resp.headers["Retry-After"]) >= 1
            gate.set()
            tg.cancel_scope.cancel()
    finally:
        gate.set()


@pytest.mark.parametrize(("raw", "want"), [
    (b"[" * 5000 + b"]" * 5000, 400),  # deep nesting
    (b'{"model": "x", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    (b'{"model": "x", "messages": "' + b"\xc3\x28" + b'"}', 400),  # invalid UTF-8
    (b'{"model": 1e400}', 400),
    (b'{"model": "' + b"a" * 300_000 + b'"}', 413),  # over the body limit
    (b"\x00\x01\x02", 400),
    (b"", 400),
])
async def test_malformed_bodies(app: Quart, raw: bytes, want: int) -> None:
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        resp = await app.test_client().post(path, data=raw,
                                            headers={"Content-Type": "application/json"})
        _check_error(resp.status_code, await resp.get_json(), want)


@pytest.mark.parametrize("fields", [
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 10**30}, {"temperature": -1},
    {"temperature": 1e308}, {"top_p": 0}, {"top_p": 2}, {"top_k": -5}, {"n": 0},
    {"presence_penalty": 3}, {"frequency_penalty": -9e99}, {"seed": "abc"},
    {"stop": [1, 2]}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"stream": "yes"}, {"max_completion_tokens": 10**9},
])
async def test_bad_numbers_and_types_in_chat(app: Quart, fields: dict[str, Any]) -> None:
    body = {"model": CHAT, "messages": HELLO, **fields}
    resp = await app.test_client().post("/v1/chat/completions", json=body)
    status = resp.status_code
    assert status in (400, 413), (fields, status)
    _check_error(status, await resp.get_json(), status)


@pytest.mark.parametrize("fields", [
    {"input": [[-1]]}, {"input": [[10**12]]}, {"input": [0.5]}, {"dimensions": 0},
    {"dimensions": -3}, {"input": None}, {"input": {"text": "x"}},
])
async def test_bad_embedding_inputs(app: Quart, fields: dict[str, Any]) -> None:
    body = {"model": "bert-tiny-cls-random", "input": "x", **fields}
    resp = await app.test_client().post("/v1/embeddings", json=body)
    _check_error(resp.status_code, await resp.get_json(), 400)
