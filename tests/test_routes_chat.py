"""HTTP behaviour of the chat, models and health routes through Quart's test client,
on the real Phi-3-layout fixture model."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from quart import Quart

from inference.chat.engine import ChatEngine
from inference.chat.model import ChatModel
from server.app import create_app
from server.settings import Settings
from tests.conftest import serving

pytestmark = [pytest.mark.anyio,
              pytest.mark.app(settings={"max_running_per_model": 2, "max_waiting_per_model": 2},
                    embedding=())]
MODEL = "phi3-tiny-random"
HELLO = [{"role": "user", "content": "hello"}]




def _events(body: bytes) -> list[Any]:
    assert body.endswith(b"data: [DONE]\n\n")
    frames = [f for f in body.split(b"\n\n") if f]
    assert all(f.startswith(b"data: ") for f in frames)
    return [orjson.loads(f[6:]) for f in frames[:-1]]


async def test_stream_is_openai_shaped(app: Quart) -> None:
    client = app.test_client()
    resp = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 6, "temperature": 0,
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    chunks = _events(await resp.get_data())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
               and c["model"] == MODEL and "usage" in c for c in chunks)
    finish = chunks[-2]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_usage_has_no_usage_field(app: Quart) -> None:
    resp = await app.test_client().post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 3})
    chunks = _events(await resp.get_data())
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_non_streamed_completion(app: Quart) -> None:
    resp = await app.test_client().post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "max_completion_tokens": 5, "seed": 3})
    body = await resp.get_json()
    assert resp.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


async def test_unset_sampling_takes_the_folders_defaults(app: Quart) -> None:
    async def text(**extra: Any) -> str:
        resp = await app.test_client().post("/v1/chat/completions", json={
            "model": MODEL, "messages": HELLO, "max_tokens": 16, **extra})
        assert resp.status_code == 200
        return str((await resp.get_json())["choices"][0]["message"]["content"])

    # The fixture's genai_config.json says do_sample: false, so leaving temperature out is
    # greedy; a request that sets it samples (random weights: 16 sampled tokens all equal to
    # the argmax would be a 1-in-astronomical event).
    greedy = await text(temperature=0)
    assert await text() == greedy and await text(seed=5) == greedy
    assert await text(temperature=1.0, seed=5) != greedy
    assert await text(top_p=0.9, seed=5) == greedy  # top_p alone does not turn sampling on


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({"model": "nope", "messages": HELLO}, 404, "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 5000}]}, 400,
     "context_length_exceeded"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 4090}, 400, "context_length_exceeded"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 10**6}, 400, "max_tokens_too_large"),
    ({"model": MODEL, "messages": HELLO, "logit_bias": {"32064": 5}}, 400, None),
    ({"model": MODEL, "messages": "hello"}, 400, None),
    ({"model": MODEL}, 400, None),
])
async def test_errors_are_openai_shaped(app: Quart, payload: dict[str, Any], status: int,
                                        code: str | None) -> None:
    for stream in (False, True):
        resp = await app.test_client().post("/v1/chat/completions",
                                            json={**payload, "stream": stream})
        body = await resp.get_json()
        assert resp.status_code == status, body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == code


async def test_malformed_json_and_wrong_method(app: Quart) -> None:
    client = app.test_client()
    resp = await client.post("/v1/chat/completions", data=b"{nope",
                             headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "not valid JSON" in (await resp.get_json())["error"]["message"]
    resp = await client.get("/v1/chat/completions")
    assert resp.status_code == 405
    assert (await resp.get_json())["error"]["code"] == "method_not_allowed"
    resp = await client.get("/nowhere")
    assert resp.status_code == 404 and "error" in await resp.get_json()


async def test_payload_too_large(phi3: ChatModel) -> None:
    async with serving(Settings(max_body_bytes=1000), chat=[phi3]) as app:
        resp = await app.test_client().post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert resp.status_code == 413
        assert (await resp.get_json())["error"]["code"] == "payload_too_large"


async def test_error_after_stream_started_is_an_event(app: Quart,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine: ChatEngine = app.extensions["npugate"].registry.entries[MODEL].chat
    calls = {"n": 0}
    real = engine.model.prepare_decode

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "prepare_decode", flaky)
    resp = await app.test_client().post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 10})
    assert resp.status_code == 200
    chunks = _events(await resp.get_data())
    assert chunks[-1]["error"]["type"] == "service_unavailable"
    assert "device lost" in chunks[-1]["error"]["message"]


async def test_models_and_health(app: Quart) -> None:
    client = app.test_client()
    models = await (await client.get("/v1/models")).get_json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["provider"] == "CPUExecutionProvider"
    assert (await client.get(f"/v1/models/{MODEL}")).status_code == 200
    assert (await client.get("/v1/models/none")).status_code == 404
    health = await (await client.get("/health")).get_json()
    assert health["status"] == "ready" and health["memory"]["rss_bytes"] > 0
    assert health["models"][0]["provider"] == "CPUExecutionProvider"


async def test_loading_then_failed_model_is_reported(tmp_path: Any) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    app = create_app(Settings(chat_models=(broken,)))
    async with app.test_app():
        client = app.test_client()
        for _ in range(100):
            health = await client.get("/health")
            if (await health.get_json())["status"] != "loading":
                break
            await anyio.sleep(0.05)
        body = await health.get_json()
        assert health.status_code == 503 and body["status"] == "failed"
        assert "genai_config.json" in body["models"][0]["error"]
        resp = await client.post("/v1/chat/completions",
                                 json={"model": "broken", "messages": HELLO})
        assert resp.status_code == 503


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-9])
async def test_tiny_temperatures_are_greedy_not_5xx(app: Quart, temperature: float) -> None:
    async def text(**extra: Any) -> str:
        resp = await app.test_client().post("/v1/chat/completions", json={
            "model": MODEL, "messages": HELLO, "max_tokens": 8, **extra})
        assert resp.status_code == 200, await resp.get_data()
        return str((await resp.get_json())["choices"][0]["message"]["content"])

    assert await text(temperature=temperature, seed=1) == await text(temperature=0)
    resp = await app.test_client().post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True,
        "temperature": temperature})
    chunks = _events(await resp.get_data())
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_logit_bias_steers_decoding(app: Quart, phi3: ChatModel) -> None:
    async def text(**extra: Any) -> str:
        resp = await app.test_client().post("/v1/chat/completions", json={
            "model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0, **extra})
        assert resp.status_code == 200, await resp.get_data()
        return str((await resp.get_json())["choices"][0]["message"]["content"])

    # +100 on one token makes it every token, greedy or sampled
    forced = phi3.tokenizer.token_to_id("▁Paris")
    assert forced is not None
    assert (await text(logit_bias={str(forced): 100})).split() == ["Paris"] * 6
    assert (await text(logit_bias={str(forced): 100}, temperature=1.0, seed=3)).split() \
        == ["Paris"] * 6
    # -100 on every token the greedy answer could start with moves the answer elsewhere
    greedy = await text()
    prefixes = {str(i): -100 for i in range(phi3.tokenizer.get_vocab_size())
                if (piece := phi3.tokenizer.decode([i])) and greedy.startswith(piece)}
    assert 0 < len(prefixes) <= 300
    assert await text(logit_bias=prefixes) != greedy


@pytest.mark.parametrize(("field", "schema", "message"), [
    ("response_format", {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "minimum": 1e40, "maximum": 1e40 + 5}}},
     "outside what the grammar engine can enforce"),
    ("response_format", {"type": "object", "properties": {"x": {"$ref": "#"}},
                         "required": ["x"]}, "no finite value"),
    ("response_format", {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(4000)}}, "compile-time budget"),
    ("tools", {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
     "no finite value"),
])
async def test_schemas_that_could_break_their_answer_get_400(app: Quart, field: str,
                                                              schema: dict[str, Any],
                                                              message: str) -> None:
    # these once came back as {"n":9223372036854775807} or {"x": with finish_reason stop
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 8}
    if field == "tools":
        body |= {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                 "tool_choice": "required"}
    else:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": schema}}
    resp = await app.test_client().post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    error = (await resp.get_json())["error"]
    assert message in error["message"] and error["param"] == field
