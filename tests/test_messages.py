"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) with the clients
that speak it: the `anthropic` Python SDK, the `@anthropic-ai/sdk` npm package and LangChain's
`ChatAnthropic`, against `npugate serve` on a real socket; and its events, errors and pings."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import orjson
import pytest
from quart import Quart

from inference.chat.model import ChatModel
from tests.conftest import LiveServer, _npm_folder, greedy_reference

SMOL = "smollm2-135m-instruct"
FRANCE = "What is the capital of France?"
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city.",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 30}},
                            "required": ["city"]}}
CLOSED = {**WEATHER["input_schema"], "additionalProperties": False}  # type: ignore[dict-item]


def client(server: LiveServer, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_create_and_stream(live_server: LiveServer, smollm2: ChatModel) -> None:
    """The model's own greedy answer, whole and streamed, with Anthropic's stop reasons and
    usage; the stream helper's final message matches."""
    sdk = client(live_server)
    expected, finish = greedy_reference(smollm2, ask(FRANCE), 24)
    whole = sdk.messages.create(model=SMOL, max_tokens=24, messages=ask(FRANCE))  # type: ignore[arg-type]
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert [b.type for b in whole.content] == ["text"]
    assert whole.content[0].text == expected  # type: ignore[union-attr]
    assert whole.stop_reason == ("end_turn" if finish == "stop" else "max_tokens")
    assert whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0) == \
        sdk.messages.count_tokens(model=SMOL, messages=ask(FRANCE)).input_tokens  # type: ignore[arg-type]
    with sdk.messages.stream(model=SMOL, max_tokens=24,
                             messages=ask(FRANCE)) as stream:  # type: ignore[arg-type]
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == expected
    assert final.content[0].text == expected and final.stop_reason == whole.stop_reason  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_has_anthropics_events(live_server: LiveServer) -> None:
    with httpx.stream("POST", live_server.base_url + "/v1/messages", timeout=60, json={
            "model": SMOL, "max_tokens": 12, "stream": True, "messages": ask(FRANCE)},
            headers={"anthropic-version": "2023-06-01"}) as resp:
        assert resp.status_code == 200
        frames = [f for f in resp.read().split(b"\n\n") if f]
    names = [f.split(b"\n")[0].removeprefix(b"event: ").decode() for f in frames]
    data = [orjson.loads(f.split(b"\n")[1].removeprefix(b"data: ")) for f in frames]
    assert [d["type"] for d in data] == names
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert data[0]["message"]["usage"]["input_tokens"] > 0
    assert data[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    # a delta holds at least one token (a token that completes no character waits)
    assert data[-2]["usage"]["output_tokens"] >= len(names) - 5 > 0


def test_a_tool_round_trip(live_server: LiveServer) -> None:
    """A forced tool (`any`) gives one tool_use whose input matches the schema; its result
    goes back as a tool_result; a named tool (`tool`) gives that tool, streamed as
    input_json_delta."""
    sdk = client(live_server)
    first = sdk.messages.create(model=SMOL, max_tokens=80, tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice={"type": "any"},
                                messages=ask("What is the weather in Paris?"))  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["tool_use"]
    use = first.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, CLOSED)
    second = sdk.messages.create(
        model=SMOL, max_tokens=30, tools=[WEATHER],  # type: ignore[list-item]
        messages=[*ask("What is the weather in Paris?"),  # type: ignore[list-item]
                  {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "sunny, 21 C"}]}])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use") and second.content
    for block in second.content:
        if block.type == "tool_use":
            jsonschema.validate(block.input, CLOSED)

    with sdk.messages.stream(model=SMOL, max_tokens=80, tools=[WEATHER],  # type: ignore[list-item]
                             tool_choice={"type": "tool", "name": "get_weather"},
                             messages=ask("Is it raining in Rome?")) as stream:  # type: ignore[arg-type]
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    (block,) = final.content
    assert block.type == "tool_use" and block.name == "get_weather"
    jsonschema.validate(block.input, CLOSED)
    assert final.stop_reason == "tool_use"


def test_stop_sequences_and_system(live_server: LiveServer, smollm2: ChatModel) -> None:
    sdk = client(live_server)
    messages = [{"role": "system", "content": "Answer in one sentence."}, *ask(FRANCE)]
    expected, _ = greedy_reference(smollm2, messages, 24)
    stop = expected.split()[2]  # a word the greedy answer contains
    got = sdk.messages.create(model=SMOL, max_tokens=24, stop_sequences=[stop],
                              system=[{"type": "text", "text": "Answer in one sentence."}],
                              messages=ask(FRANCE))  # type: ignore[arg-type]
    assert got.stop_reason == "stop_sequence" and got.stop_sequence == stop
    assert got.content[0].text == expected[:expected.index(stop)]  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "fragment"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]}, "image blocks"),
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": "x"}}]}]}, "document blocks"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tools"),
    ({"max_tokens": None}, "max_tokens"),
])
def test_what_cannot_be_done_is_an_anthropic_400(live_server: LiveServer,
                                                 body: dict[str, Any], fragment: str) -> None:
    payload = {"model": SMOL, "max_tokens": 10, "messages": ask("hi"), **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    resp = httpx.post(live_server.base_url + "/v1/messages", json=payload, timeout=30)
    assert resp.status_code == 400
    error = resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


def test_an_over_long_prompt_and_an_unknown_model(live_server: LiveServer) -> None:
    sdk = client(live_server)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model=SMOL, max_tokens=10, messages=ask("lighthouse " * 9000))  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "context length" in caught.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="no-such-model", max_tokens=10, messages=ask("hi"))  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.fixture(scope="module")
def keyed(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(chat=[smollm2_dir], embedding=[],
                        log=tmp_path_factory.mktemp("messages") / "server.log",
                        extra=["--api-key", "sk-ant-test"])
    yield server
    server.stop()


def test_keys_in_x_api_key(keyed: LiveServer) -> None:
    """Anthropic's clients send `x-api-key`; a wrong one is Anthropic's 401."""
    # Closed explicitly: a client caught in an error's traceback is freed by the cycle
    # collector, which may finalise its socket before the client closes it.
    with client(keyed, "sk-ant-test") as good, client(keyed, "sk-wrong") as wrong:
        answer = good.messages.create(model=SMOL, max_tokens=4, messages=ask("hi"))  # type: ignore[arg-type]
        assert answer.content
        with pytest.raises(anthropic.AuthenticationError) as caught:
            wrong.messages.create(model=SMOL, max_tokens=4, messages=ask("hi"))  # type: ignore[arg-type]
        assert caught.value.status_code == 401
        assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.count_tokens(model=SMOL, messages=ask("hi"))  # type: ignore[arg-type]
    bearer = httpx.post(keyed.base_url + "/v1/messages", timeout=30,
                        headers={"Authorization": "Bearer sk-ant-test"},
                        json={"model": SMOL, "max_tokens": 2, "messages": ask("hi")})
    assert bearer.status_code == 200


def test_a_client_that_leaves_stops_the_work(live_server: LiveServer) -> None:
    body = {"model": SMOL, "max_tokens": 2000, "stream": True,
            "messages": ask("Write a long story.")}
    live_server.leave_mid_stream("/v1/messages", body, "text_delta", SMOL)


@pytest.mark.anyio
@pytest.mark.app(settings={"sse_ping_interval_s": 0.001}, chat=("smollm2",), embedding=())
async def test_silences_send_pings(app: Quart) -> None:
    """A decode step of SmolLM2 takes milliseconds: silences longer than the interval."""
    resp = await app.test_client().post("/v1/messages", json={
        "model": SMOL, "max_tokens": 20, "stream": True, "messages": ask("hi")})
    body = await resp.get_data()
    assert b'event: ping\ndata: {"type":"ping"}\n\n' in body
    assert body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_overload_is_529() -> None:
    """Where OpenAI's side answers 503 (here: the server is shutting down), Anthropic's
    clients get 529 overloaded_error."""
    from server.core.errors import anthropic_error, unavailable

    status, body = anthropic_error(unavailable("busy", code="shutting_down"))
    assert status == 529 and body["error"]["type"] == "overloaded_error"


ANTHROPIC_NPM = {"@anthropic-ai/sdk": "1.17.0"}
NODE_SCRIPT = """
import Anthropic from "@anthropic-ai/sdk";
const client = new Anthropic({ baseURL: process.env.BASE_URL, apiKey: "unused", maxRetries: 0 });
const stream = client.messages.stream({ model: "smollm2-135m-instruct", max_tokens: 24,
  temperature: 0, messages: [{ role: "user", content: "What is the capital of France?" }] });
let text = "", deltas = 0;
stream.on("text", (piece) => { text += piece; deltas += 1; });
const final = await stream.finalMessage();
console.log(JSON.stringify({ text, deltas, final: final.content[0].text,
                             stop: final.stop_reason, usage: final.usage }));
"""


def test_node_sdk_streams_a_message(live_server: LiveServer, smollm2: ChatModel) -> None:
    folder = _npm_folder(ANTHROPIC_NPM)
    script = folder / "stream.mjs"
    script.write_text(NODE_SCRIPT)
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BASE_URL": live_server.base_url})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected, _ = greedy_reference(smollm2, ask(FRANCE), 24)
    assert result["text"] == expected == result["final"] and result["deltas"] > 3
    assert result["usage"]["output_tokens"] > 0


def test_langchain_chat_anthropic(live_server: LiveServer, smollm2: ChatModel) -> None:
    from langchain_anthropic import ChatAnthropic

    chat = ChatAnthropic(model_name=SMOL, base_url=live_server.base_url, api_key="unused",  # type: ignore[arg-type]
                         temperature=0, max_tokens_to_sample=24, max_retries=0,
                         timeout=60, stop=None)
    expected, _ = greedy_reference(smollm2, ask(FRANCE), 24)
    assert chat.invoke(FRANCE).content == expected
    pieces = [str(chunk.content) if isinstance(chunk.content, str) else
              "".join(p.get("text", "") for p in chunk.content if isinstance(p, dict))
              for chunk in chat.stream(FRANCE)]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 3

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    calls = message.tool_calls  # type: ignore[attr-defined]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert isinstance(calls[0]["args"].get("city"), str)
