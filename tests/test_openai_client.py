"""The official `openai` SDK against `npugate serve` on a real loopback socket."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from inference.chat.model import ChatModel
from tests.conftest import LiveServer, greedy_reference

SMOL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def test_streamed_text_equals_non_streamed_text(client: openai.OpenAI,
                                                smollm2: ChatModel) -> None:
    whole = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0,
                                           max_tokens=40)  # type: ignore[arg-type]
    text = whole.choices[0].message.content
    reference, reference_finish = greedy_reference(smollm2, FRANCE, 40)
    assert text == reference and whole.choices[0].finish_reason == reference_finish
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0,
                                            max_tokens=40, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.model_dump() == whole.usage.model_dump()
    # It really streamed, a token at a time.
    assert len([p for p in pieces if p]) >= 6


def test_usage_counts_are_real_token_counts(client: openai.OpenAI) -> None:
    from tokenizers import Tokenizer

    resp = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0,
                                          max_tokens=7)  # type: ignore[arg-type]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    # system prompt + user turn + generation prompt, as SmolLM2's template renders them
    rendered = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert resp.usage.prompt_tokens == 37
    tok_count = len(Tokenizer.from_str(_tokenizer_json()).encode(
        rendered, add_special_tokens=False).ids)
    assert resp.usage.prompt_tokens == tok_count


def _tokenizer_json() -> str:
    from inference.prepare import default_models_dir
    return (default_models_dir() / SMOL / "tokenizer.json").read_text()


def test_errors_surface_as_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "word " * 9000}])
    assert err.value.code == "context_length_exceeded"
    # above the server's cap: a BadRequestError naming max_tokens, as OpenAI answers
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=SMOL, messages=FRANCE,  # type: ignore[arg-type]
                                       max_tokens=10**6)
    assert too_many.value.param == "max_tokens"
    # a chat model on the embeddings endpoint: 400 naming what it serves, not 404
    with pytest.raises(openai.BadRequestError) as wrong_task:
        client.embeddings.create(model=SMOL, input="hello")
    assert "chat model" in str(wrong_task.value) and wrong_task.value.param == "model"


def test_phi3_layout_served_alongside(client: openai.OpenAI) -> None:
    models = client.models.list().data
    # the models served from start-up first; then others prepared in the models directory,
    # loaded on demand
    assert [m.id for m in models][:3] == [SMOL, "phi3-tiny-random", "all-minilm-l6-v2"]
    assert all((m.model_extra or {})["loaded"] for m in models[:3])
    resp = client.chat.completions.create(model="phi3-tiny-random", messages=FRANCE,
                                          max_tokens=5, seed=1)  # type: ignore[arg-type]
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def _smol_stats(server: LiveServer) -> dict[str, int]:
    entry = next(m for m in server.health()["models"] if m["id"] == SMOL)
    return {**entry["stats"], "running": entry["requests_running"]}


def test_client_disconnect_stops_generation(live_server: LiveServer) -> None:
    before = _smol_stats(live_server)
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 2000, "stream": True, "temperature": 0.8}
    with httpx.stream("POST", live_server.base_url + "/v1/chat/completions", json=body,
                      timeout=30) as resp:
        lines = 0
        for line in resp.iter_lines():
            lines += line.startswith("data: ")
            if lines >= 5:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _smol_stats(live_server)
        if after["cancelled_total"] > before["cancelled_total"] and after["running"] == 0:
            break
        time.sleep(0.05)
    assert after["cancelled_total"] == before["cancelled_total"] + 1
    assert after["running"] == 0
    steps = after["decode_runs_total"]
    time.sleep(0.5)
    assert _smol_stats(live_server)["decode_runs_total"] == steps  # nothing decodes on
    assert steps - before["decode_runs_total"] < 100  # far from the 2000 asked for


MINILM = "all-minilm-l6-v2"


def test_sdk_embeddings_default_base64_and_float(client: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "A feline rests on a rug.", "Stocks fell."]
    default = client.embeddings.create(model=MINILM, input=texts)  # SDK asks for base64
    floats = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    import numpy as np

    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[0] @ a[1] > 0.5 > a[0] @ a[2]
    assert default.usage.prompt_tokens == default.usage.total_tokens > 3


def test_concurrent_requests_are_batched(live_server: LiveServer) -> None:
    import concurrent.futures

    import numpy as np

    def runs() -> int:
        entry = next(m for m in live_server.health()["models"] if m["id"] == MINILM)
        return int(entry["stats"]["model_runs_total"])

    texts = [f"request {i}: {'a poem about the sea' if i % 3 else 'quarterly earnings'}"
             for i in range(64)]
    url = live_server.base_url + "/v1/embeddings"
    with httpx.Client(timeout=60) as http:
        alone = [http.post(url, json={"model": MINILM, "input": t}).json()["data"][0]["embedding"]
                 for t in texts[:8]]
        before = runs()
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(
                lambda t: http.post(url, json={"model": MINILM, "input": t}).json(), texts))
    after = runs()
    for i, body in enumerate(results):
        assert body["data"][0]["index"] == 0
        if i < 8:
            np.testing.assert_allclose(body["data"][0]["embedding"], alone[i], atol=1e-5)
    assert after - before < 64  # fewer model runs than requests


def test_sdk_with_api_keys(phi3_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nsk-alpha\n\nsk-beta\n")
    server = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "server.log",
                        extra=["--api-key-file", str(key_file)])
    try:
        # closed explicitly: one caught in an error's traceback would be freed by the cycle
        # collector, which may finalise its socket first (a ResourceWarning)
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-beta",
                           max_retries=0) as good:
            resp = good.chat.completions.create(model="phi3-tiny-random", max_tokens=2,
                                                messages=FRANCE)  # type: ignore[arg-type]
        assert resp.usage is not None and resp.usage.completion_tokens == 2
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-gamma",
                           max_retries=0) as bad, pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert "sk-alpha" not in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


def test_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0.8, n=3,
                                           seed=11, max_tokens=16)  # type: ignore[arg-type]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.message.content for c in whole.choices)
    assert whole.usage is not None and 3 <= whole.usage.completion_tokens <= 48
    texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finish: dict[int, str] = {}
    stream = client.chat.completions.create(
        model=SMOL, messages=FRANCE, temperature=0.8, n=3, seed=11,  # type: ignore[arg-type]
        max_tokens=16, stream=True)
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    # the same seed gives the same three answers, streamed or not
    assert ["".join(texts[i]) for i in range(3)] == [c.message.content for c in whole.choices]
    assert sorted(finish) == [0, 1, 2]


def test_n_choices_without_temperature_are_alternatives(client: openai.OpenAI) -> None:
    # SmolLM2's folder decodes greedily by default; n choices then sample at OpenAI's default
    # temperature rather than repeat one greedy answer, and one choice stays greedy
    greedy = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=16,
                                            temperature=0)  # type: ignore[arg-type]
    alone = client.chat.completions.create(model=SMOL, messages=FRANCE,
                                           max_tokens=16)  # type: ignore[arg-type]
    assert alone.choices[0].message.content == greedy.choices[0].message.content
    several = client.chat.completions.create(model=SMOL, messages=FRANCE, n=4, seed=3,
                                             max_tokens=16)  # type: ignore[arg-type]
    texts = [c.message.content for c in several.choices]
    assert len(set(texts)) > 1, texts
    copies = client.chat.completions.create(model=SMOL, messages=FRANCE, n=2, temperature=0,
                                            max_tokens=16)  # type: ignore[arg-type]
    assert len({c.message.content for c in copies.choices}) == 1  # asked for greedy: kept


def test_legacy_completions(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=SMOL, prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model=SMOL, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == whole.choices[0].text


def test_cached_tokens_in_usage(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You answer in one short sentence. " * 12}
    first = client.chat.completions.create(
        model=SMOL, max_tokens=8, temperature=0,
        messages=[system, {"role": "user", "content": "Name a colour."}])  # type: ignore[list-item]
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    answer = first.choices[0].message.content or ""
    time.sleep(0.3)  # the engine keeps the prompt once the request has left the pool
    usage = None
    for chunk in client.chat.completions.create(
            model=SMOL, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[system, {"role": "user", "content": "Name a colour."},  # type: ignore[list-item]
                      {"role": "assistant", "content": answer},
                      {"role": "user", "content": "And another?"}]):
        usage = chunk.usage or usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= 64 and cached % 64 == 0
    assert cached < usage.prompt_tokens
