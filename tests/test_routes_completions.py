"""Legacy `/v1/completions` through Quart's test client, on the Phi-3-layout fixture."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from quart import Quart

from inference.chat.model import ChatModel
from tests.conftest import serving

pytestmark = [pytest.mark.anyio,
              pytest.mark.app(settings={"max_running_per_model": 8}, embedding=())]
MODEL = "phi3-tiny-random"




async def _post(app: Quart, **body: Any) -> tuple[int, Any]:
    resp = await app.test_client().post("/v1/completions", json={"model": MODEL, **body})
    return resp.status_code, await resp.get_json()


def _events(body: bytes) -> list[Any]:
    assert body.endswith(b"data: [DONE]\n\n")
    return [orjson.loads(f[6:]) for f in [f for f in body.split(b"\n\n") if f][:-1]]


async def test_text_completion_shape_and_default_length(app: Quart) -> None:
    status, body = await _post(app, prompt="Once upon a time", temperature=0)
    assert status == 200 and body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] > 0


async def test_streamed_equals_whole_and_no_template(app: Quart, phi3: ChatModel) -> None:
    status, whole = await _post(app, prompt="The sea is", max_tokens=12, temperature=0)
    resp = await app.test_client().post("/v1/completions", json={
        "model": MODEL, "prompt": "The sea is", "max_tokens": 12, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    chunks = _events(await resp.get_data())
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"]
    # the prompt is the text itself, tokenized as the model expects it (no chat template)
    expected = len(phi3.tokenizer.encode("The sea is", add_special_tokens=True).ids)
    assert whole["usage"]["prompt_tokens"] == expected


async def test_several_prompts_token_ids_n_and_echo(app: Quart, phi3: ChatModel) -> None:
    ids = phi3.tokenizer.encode("The sea is", add_special_tokens=True).ids
    status, from_text = await _post(app, prompt="The sea is", max_tokens=6, temperature=0)
    status, from_ids = await _post(app, prompt=ids, max_tokens=6, temperature=0)
    assert from_ids["choices"][0]["text"] == from_text["choices"][0]["text"]
    status, body = await _post(app, prompt=["The sea is", "hello"], n=2, max_tokens=6,
                               temperature=0)
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] == from_text["choices"][0]["text"]  # greedy: n equal answers
    assert body["usage"]["completion_tokens"] == 4 * 6
    status, echoed = await _post(app, prompt="The sea is", max_tokens=6, temperature=0,
                                 echo=True)
    assert echoed["choices"][0]["text"] == "The sea is" + from_text["choices"][0]["text"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "echo": True, "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": ["a"] * 9}, "prompt"),
    ({"prompt": ["a", "b"], "n": 5}, "n"),
    ({"prompt": [[1]] * 500_000}, "prompt"),  # counted before it is validated
    ({"prompt": [1] * 5000}, "prompt"),  # longer than the 4096-token context
])
async def test_refusals_are_clear_400s(app: Quart, body: dict[str, Any], param: str) -> None:
    status, err = await _post(app, **body)
    assert status == 400, err
    assert err["error"]["param"] == param and err["error"]["message"]


async def test_an_embedding_model_is_refused_by_task(phi3: ChatModel,
                                                     bert_tiny: Any) -> None:

    async with serving(chat=[phi3], embedding=[bert_tiny]) as app:
        resp = await app.test_client().post("/v1/completions", json={
            "model": "bert-tiny-cls-random", "prompt": "hi"})
        assert resp.status_code == 400
        assert (await resp.get_json())["error"]["code"] == "wrong_model_task"
