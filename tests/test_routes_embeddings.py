"""/v1/embeddings through Quart's test client, on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from quart import Quart

from inference.embed.model import EmbeddingModel
from tests.conftest import serving

pytestmark = [pytest.mark.anyio,
              pytest.mark.app(settings={"embedding_max_inputs": 8, "max_body_bytes": 64 * 1024},
                    chat=(), embedding=("minilm",))]
MODEL = "all-minilm-l6-v2"




async def _post(app: Quart, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await app.test_client().post("/v1/embeddings", json=body)
    return resp.status_code, await resp.get_json()


async def test_float_and_base64_agree(app: Quart, minilm: EmbeddingModel) -> None:
    status, floats = await _post(app, {"model": MODEL, "input": ["hello world", "bye"]})
    assert status == 200 and floats["object"] == "list" and floats["model"] == MODEL
    assert [d["index"] for d in floats["data"]] == [0, 1]
    status, b64 = await _post(app, {"model": MODEL, "input": ["hello world", "bye"],
                                    "encoding_format": "base64"})
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        np.testing.assert_allclose(decoded, f["embedding"], atol=1e-7)
    want = minilm.embed_batch(minilm.tokenize(["hello world"]))[0]
    np.testing.assert_allclose(floats["data"][0]["embedding"], want, atol=1e-5)
    tokens = sum(len(x) for x in minilm.tokenize(["hello world", "bye"]))
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_every_input_shape(app: Quart, minilm: EmbeddingModel) -> None:
    ids = minilm.tokenizer.encode("hello world", add_special_tokens=False).ids
    _, text = await _post(app, {"model": MODEL, "input": "hello world"})
    _, one = await _post(app, {"model": MODEL, "input": ids})
    _, many = await _post(app, {"model": MODEL, "input": [ids, ids]})
    assert len(text["data"]) == len(one["data"]) == 1 and len(many["data"]) == 2
    np.testing.assert_allclose(one["data"][0]["embedding"], text["data"][0]["embedding"],
                               atol=1e-6)
    assert one["usage"] == text["usage"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "input": ""}, 400, "input"),
    ({"model": MODEL, "input": ["ok", "  "]}, 400, "input"),
    ({"model": MODEL, "input": []}, 400, "input"),
    ({"model": MODEL, "input": 5}, 400, "input"),
    ({"model": MODEL, "input": [1.5, 2]}, 400, "input"),
    ({"model": MODEL, "input": [["a"]]}, 400, "input"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": MODEL, "input": [10**9]}, 400, "input"),
    ({"model": MODEL, "input": "word " * 400}, 400, "input"),
    ({"model": MODEL, "input": ["a"] * 9}, 413, "input"),
    ({"model": MODEL, "input": [None] * 9}, 413, "input"),  # counted before validation
    ({"model": MODEL, "input": [[1] * 10_000]}, 400, "input"),  # too long, before validation
    ({"model": MODEL, "input": "x", "dimensions": 64}, 400, "dimensions"),
    ({"model": "nope", "input": "x"}, 404, "model"),
    ({"input": "x"}, 400, "model"),
])
async def test_bad_input(app: Quart, body: dict[str, Any], status: int, param: str) -> None:
    got, payload = await _post(app, body)
    assert got == status, payload
    assert payload["error"]["param"] == param
    assert set(payload["error"]) == {"message", "type", "param", "code"}


async def test_over_long_input_says_context_length(app: Quart) -> None:
    _, payload = await _post(app, {"model": MODEL, "input": "word " * 400})
    assert payload["error"]["code"] == "context_length_exceeded"


async def test_payload_too_large(app: Quart) -> None:
    status, payload = await _post(app, {"model": MODEL, "input": "x" * 100_000})
    assert status == 413 and payload["error"]["code"] == "payload_too_large"


async def test_models_and_health_report_the_provider(app: Quart) -> None:
    client = app.test_client()
    models = await (await client.get("/v1/models")).get_json()
    assert models["data"][0]["task"] == "embedding"
    assert models["data"][0]["provider"] == "CPUExecutionProvider"
    health = await (await client.get("/health")).get_json()
    entry = health["models"][0]
    assert entry["status"] == "ready" and "model_runs_total" in entry["stats"]


async def test_huge_text_is_refused_before_tokenizing(minilm: EmbeddingModel,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tokenizing(texts: Any) -> Any:
        raise AssertionError("tokenized a text that cannot fit")

    monkeypatch.setattr(minilm, "tokenize", no_tokenizing)
    async with serving(embedding=[minilm]) as app:
        for inp in ("word " * 800_000, ["short", "é" * 5000]):
            status, body = await _post(app, {"model": MODEL, "input": inp})
            assert status == 400 and body["error"]["code"] == "context_length_exceeded"
            assert "bytes" in body["error"]["message"] and body["error"]["param"] == "input"


async def test_a_chat_model_here_is_a_400_naming_its_task(minilm: EmbeddingModel,
                                                           phi3: Any) -> None:

    async with serving(chat=[phi3], embedding=[minilm]) as app:
        status, body = await _post(app, {"model": "phi3-tiny-random", "input": "hi"})
        assert status == 400 and body["error"]["code"] == "wrong_model_task"
        assert "chat model" in body["error"]["message"]
        resp = await app.test_client().post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        body = await resp.get_json()
        assert resp.status_code == 400 and "embedding model" in body["error"]["message"]
