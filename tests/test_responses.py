"""The Responses API (`/v1/responses`) with the clients that call it first: the OpenAI Python
SDK, the Agents SDK's default model, pydantic-ai's "openai:" models, the Vercel AI SDK's
default provider and Codex CLI, against `npugate serve` on a real socket; and the store: per
key, across a restart, after a killed process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from openai import NotFoundError, OpenAI
from pydantic import BaseModel, Field

from inference.chat.model import ChatModel
from server.core.database import SQLITE_FILE, SQLiteDatabase
from server.responses.store import SCHEMA, ResponseStore, Retention, StoredResponse
from tests.conftest import LiveServer, greedy_reference

SMOL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                    "maxLength": 30}},
                          "required": ["city"]}}
# A system prompt long enough that a conversation's shared prefix fills the prompt cache's
# 64-token blocks from the second turn on
GUIDE = ("You are a travel guide for visitors to European capitals. Answer in two or three "
         "sentences, name one place to visit, and mention how to get there by public "
         "transport. Be friendly, precise and brief; never invent opening hours or prices.")


def client(server: LiveServer, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "additionalProperties": False}


def test_create_whole_and_streamed(live_server: LiveServer, smollm2: ChatModel) -> None:
    """The answer is the model's own greedy answer, whole or streamed; the stream's events
    come in the order the SDK's helper accumulates, numbered without gaps."""
    sdk = client(live_server)
    question = "What is the capital of France?"
    expected, finish = greedy_reference(smollm2, [{"role": "user", "content": question}], 24)
    whole = sdk.responses.create(model=SMOL, input=question, max_output_tokens=24,
                                 temperature=0)
    assert whole.output_text == expected
    assert whole.status == ("completed" if finish == "stop" else "incomplete")
    assert whole.usage is not None and whole.usage.output_tokens > 0
    assert whole.usage.input_tokens == sdk.responses.input_tokens.count(
        model=SMOL, input=question).input_tokens

    with sdk.responses.stream(model=SMOL, input=question, max_output_tokens=24,
                              temperature=0) as stream:
        events = list(stream)
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    last = "response.completed" if finish == "stop" else "response.incomplete"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", last]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert deltas == expected and events[-1].response.output_text == expected  # type: ignore[union-attr]


def test_incomplete_at_max_output_tokens(live_server: LiveServer) -> None:
    raw = httpx.post(live_server.base_url + "/v1/responses", timeout=60, json={
        "model": SMOL, "input": "Write a long story about a lighthouse.",
        "max_output_tokens": 5}).json()
    assert raw["status"] == "incomplete"
    assert raw["incomplete_details"] == {"reason": "max_output_tokens"}
    assert raw["usage"]["output_tokens"] == 5


def test_parse_gives_a_pydantic_object(live_server: LiveServer) -> None:
    class Capital(BaseModel):
        country: str = Field(max_length=30)
        capital: str = Field(max_length=30)

    parsed = client(live_server).responses.parse(
        model=SMOL, input="What is the capital of France?", text_format=Capital,
        max_output_tokens=80)
    assert isinstance(parsed.output_parsed, Capital) and parsed.output_parsed.capital


def test_a_function_tool_round_trip(live_server: LiveServer) -> None:
    """A forced call (one, with valid arguments), its output sent back as
    `function_call_output` after `previous_response_id`, and an answer; the same streamed."""
    sdk = client(live_server)
    first = sdk.responses.create(model=SMOL, input="What is the weather in Paris?",
                                 tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                 max_output_tokens=60)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and len(first.output) == 1 and first.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id
    jsonschema.validate(json.loads(call.arguments), closed(WEATHER["parameters"]))  # type: ignore[arg-type]
    answer = sdk.responses.create(
        model=SMOL, previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny, 21 C"}], max_output_tokens=30)
    assert answer.status in ("completed", "incomplete") and answer.output
    items = sdk.responses.input_items.list(answer.id, order="asc")
    assert [i.type for i in items.data] == ["message", "function_call", "function_call_output"]

    with sdk.responses.stream(model=SMOL, input="What is the weather in Rome?",
                              tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                              max_output_tokens=60) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[2] == "response.output_item.added"
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    (streamed,) = final.output
    assert streamed.type == "function_call"
    jsonschema.validate(json.loads(streamed.arguments), closed(WEATHER["parameters"]))  # type: ignore[arg-type]


def test_previous_response_id_reads_only_the_new_turn(live_server: LiveServer) -> None:
    """Three turns: each later one reuses the earlier turns' KV (cached_tokens), and a
    chat-completions request with the same history reads the same prompt."""
    sdk = client(live_server)
    previous, cached, prompts = None, [], []
    for question in ("Tell me about Paris.", "What about its museums?", "And its food?"):
        turn = sdk.responses.create(model=SMOL, instructions=GUIDE, input=question,
                                    previous_response_id=previous, max_output_tokens=40)
        assert turn.usage is not None
        cached.append(turn.usage.input_tokens_details.cached_tokens)
        prompts.append(turn.usage.input_tokens)
        previous = turn.id
    assert cached[1] > 0 and cached[2] > 0 and prompts[0] < prompts[1] < prompts[2]
    assert cached[2] >= prompts[1] - 64  # all but the last partial block of turn 2's prompt
    items = sdk.responses.input_items.list(previous)  # type: ignore[arg-type]
    assert [i.type for i in items.data] == ["message"] * 5  # newest first: 3 asked, 2 answered


def test_store_get_delete_and_input_items(live_server: LiveServer) -> None:
    sdk = client(live_server)
    unstored = sdk.responses.create(model=SMOL, input="Hi", store=False, max_output_tokens=4)
    with pytest.raises(NotFoundError):
        sdk.responses.retrieve(unstored.id)
    stored = sdk.responses.create(model=SMOL, max_output_tokens=4, input=[
        {"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
        {"role": "user", "content": [{"type": "input_text", "text": "Three"}]}],
        metadata={"run": "test"})
    got = sdk.responses.retrieve(stored.id)
    assert got.id == stored.id and got.output_text == stored.output_text
    assert got.metadata == {"run": "test"}
    page = sdk.responses.input_items.list(stored.id, limit=2)
    texts = [i.content[0].text for i in page.data]  # type: ignore[union-attr]
    assert texts == ["Three", "Two"] and page.has_more
    rest = sdk.responses.input_items.list(stored.id, limit=2, after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["One"] and not rest.has_more  # type: ignore[union-attr]
    sdk.responses.delete(stored.id)
    with pytest.raises(NotFoundError):
        sdk.responses.retrieve(stored.id)
    with pytest.raises(NotFoundError):
        sdk.responses.delete(stored.id)
    with pytest.raises(NotFoundError):
        sdk.responses.create(model=SMOL, input="x", previous_response_id=stored.id)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"background": True}, "background"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"max_output_tokens": 100000}, "max_tokens"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format.name"),
])
def test_what_cannot_be_done_is_a_400_naming_the_field(live_server: LiveServer,
                                                       body: dict[str, Any], param: str
                                                       ) -> None:
    resp = httpx.post(live_server.base_url + "/v1/responses", timeout=30,
                      json={"model": SMOL, "input": "Hi", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_client_that_leaves_stops_the_work(live_server: LiveServer) -> None:
    body = {"model": SMOL, "input": "Write a long story.", "stream": True,
            "max_output_tokens": 2000}
    live_server.leave_mid_stream("/v1/responses", body, "output_text.delta", SMOL)


def test_health_and_metrics_show_the_store(live_server: LiveServer) -> None:
    client(live_server).responses.create(model=SMOL, input="Hi", max_output_tokens=2)
    store = live_server.health()["response_store"]
    assert store["kind"] == "sqlite" and store["reachable"] and store["entries"] >= 1
    assert store["bytes"] > 0
    metrics = httpx.get(live_server.base_url + "/metrics", timeout=10).text
    assert 'npugate_e2e_request_latency_seconds_count{endpoint="responses"' in metrics


# --- the store across keys, restarts and a killed process --------------------------------

@pytest.fixture
def data_server(smollm2_dir: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, Path]]:
    """A server with two keys and its own data directory."""
    data = tmp_path / "data"
    server = LiveServer(chat=[smollm2_dir], embedding=[], log=tmp_path / "server.log",
                        extra=["--api-key", "sk-a", "--api-key", "sk-b", "--data-dir",
                               str(data)])
    yield server, data
    server.stop()


def _restart(server: LiveServer, smollm2_dir: Path, data: Path, log: Path) -> LiveServer:
    return LiveServer(chat=[smollm2_dir], embedding=[], log=log, port=server.port,
                      extra=["--api-key", "sk-a", "--api-key", "sk-b", "--data-dir", str(data)])


def test_a_response_is_its_keys_alone(data_server: tuple[LiveServer, Path]) -> None:
    server, _ = data_server
    mine = client(server, "sk-a").responses.create(model=SMOL, input="My secret plan.",
                                                   max_output_tokens=4)
    other = client(server, "sk-b")
    for call in (lambda: other.responses.retrieve(mine.id),
                 lambda: other.responses.input_items.list(mine.id),
                 lambda: other.responses.delete(mine.id),
                 lambda: other.responses.create(model=SMOL, input="Go on.",
                                                previous_response_id=mine.id)):
        with pytest.raises(NotFoundError) as caught:
            call()
        assert "secret" not in caught.value.response.text
    assert client(server, "sk-a").responses.retrieve(mine.id).id == mine.id
    assert httpx.get(f"{server.base_url}/v1/responses/{mine.id}").status_code == 401


def test_a_conversation_survives_a_restart(data_server: tuple[LiveServer, Path],
                                           smollm2_dir: Path, tmp_path: Path) -> None:
    server, data = data_server
    first = client(server, "sk-a").responses.create(model=SMOL, instructions=GUIDE,
                                                    input="Tell me about Rome.",
                                                    max_output_tokens=20)
    server.stop()
    again = _restart(server, smollm2_dir, data, tmp_path / "again.log")
    try:
        sdk = client(again, "sk-a")
        assert sdk.responses.retrieve(first.id).output_text == first.output_text
        second = sdk.responses.create(model=SMOL, instructions=GUIDE, input="And its food?",
                                      previous_response_id=first.id, max_output_tokens=10)
        assert second.usage is not None and first.usage is not None
        # the history is read again (its KV went with the old process)
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        items = sdk.responses.input_items.list(second.id, order="asc")
        assert [i.content[0].text for i in items.data] == [  # type: ignore[union-attr]
            "Tell me about Rome.", first.output_text, "And its food?"]
    finally:
        again.stop()


def test_a_killed_server_leaves_a_readable_store(data_server: tuple[LiveServer, Path],
                                                 smollm2_dir: Path, tmp_path: Path) -> None:
    server, data = data_server
    sdk = client(server, "sk-a")
    made = [sdk.responses.create(model=SMOL, input=f"Count to {i}.", max_output_tokens=3).id
            for i in range(5)]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    db = sqlite3.connect(data / SQLITE_FILE)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone() == (5,)
    finally:
        db.close()
    again = _restart(server, smollm2_dir, data, tmp_path / "again.log")
    try:
        assert [client(again, "sk-a").responses.retrieve(i).id for i in made] == made
    finally:
        again.stop()


def test_retention_drops_the_oldest(tmp_path: Path) -> None:
    """Past its size bound the store drops the oldest responses; every one is readable until
    it goes."""
    async def fill() -> tuple[int, list[str]]:
        db = SQLiteDatabase(tmp_path / "r.sqlite3")
        await db.open(SCHEMA)
        store = ResponseStore(db, Retention(max_age_s=0, max_bytes=20_000))
        ids = []
        for i in range(200):
            ids.append(f"resp_{i:03d}")
            await store.put(StoredResponse(ids[-1], "k", float(i), {"n": "x" * 400}, []))
        stats = await store.stats()
        kept = [i for i in ids if await store.get(i, "k") is not None]
        await db.close()
        return stats["bytes"], kept

    size, kept = anyio.run(fill)
    assert size <= 20_000 + 64 * 500  # checked every 64 writes
    assert kept == sorted(kept) and kept[-1] == "resp_199" and "resp_000" not in kept


# --- clients that call /v1/responses by default ------------------------------------------

AGENTS_SCRIPT = """
import json, sys
from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                    set_tracing_disabled)
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

set_tracing_disabled(True)
base, smol = sys.argv[1], sys.argv[2]
# the default model: a model name resolves to the Responses API
set_default_openai_client(AsyncOpenAI(base_url=base, api_key="unused", max_retries=0),
                          use_for_tracing=False)
ran = []

@function_tool
def get_weather(city: str) -> str:
    '''Get the current weather in a city.'''
    ran.append(city)
    return f"sunny and 21 C in {city}"

class Capital(BaseModel):
    country: str = Field(max_length=30)
    capital: str = Field(max_length=30)

weather = Agent(name="weather", instructions="Answer with the weather tool.", model=smol,
                tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                model_settings=ModelSettings(tool_choice="required", max_tokens=100))
facts = Agent(name="facts", instructions="Answer with the country and its capital.",
              model=smol, output_type=Capital, model_settings=ModelSettings(max_tokens=80))
w = Runner.run_sync(weather, "What is the weather in Paris right now?", max_turns=4)
f = Runner.run_sync(facts, "What is the capital of France?", max_turns=2)
print(json.dumps({"ran": ran, "weather": str(w.final_output),
                  "weather_turns": len(w.raw_responses),
                  "facts": f.final_output.model_dump(), "facts_type": type(f.final_output).__name__,
                  "response_ids": [r.response_id for r in w.raw_responses + f.raw_responses]}))
"""


def test_agents_sdk_default_model(live_server: LiveServer) -> None:
    """An agent with a function tool runs it once and ends with its result; an agent with an
    output_type ends with that type; both through /v1/responses."""
    out = subprocess.run([sys.executable, "-c", AGENTS_SCRIPT, live_server.base_url + "/v1",
                          SMOL], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["ran"]) == 1 and result["weather_turns"] == 1
    assert result["weather"] == f"sunny and 21 C in {result['ran'][0]}"
    assert result["facts_type"] == "Capital" and set(result["facts"]) == {"country", "capital"}
    assert all(i.startswith("resp_") for i in result["response_ids"])


PYDANTIC_AI_SCRIPT = """
import json, os, sys
os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = sys.argv[1], "unused"
from pydantic_ai import Agent
agent = Agent(f"openai:{sys.argv[2]}", model_settings={"temperature": 0, "max_tokens": 24})
result = agent.run_sync("What is the capital of France?")
print(json.dumps({"model": type(agent.model).__name__, "output": result.output,
                  "requests": result.usage().requests}))
"""


def test_pydantic_ai_openai_model_string(live_server: LiveServer, smollm2: ChatModel) -> None:
    out = subprocess.run([sys.executable, "-c", PYDANTIC_AI_SCRIPT,
                          live_server.base_url + "/v1", SMOL],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == "OpenAIResponsesModel" and result["requests"] == 1
    expected, _ = greedy_reference(
        smollm2, [{"role": "user", "content": "What is the capital of France?"}], 24)
    assert result["output"] == expected


VERCEL_SCRIPT = """
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText, stepCountIs, tool } from "ai";
import { z } from "zod";

const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: "unused" });
const model = openai("smollm2-135m-instruct");  // the default provider: the Responses API
const whole = await generateText({ model, prompt: "What is the capital of France?",
                                   temperature: 0, maxOutputTokens: 24 });
const stream = streamText({ model, prompt: "What is the capital of France?", temperature: 0,
                            maxOutputTokens: 24 });
let streamed = "", parts = 0;
for await (const piece of stream.textStream) { streamed += piece; parts += 1; }
const ran = [];
const called = await generateText({
  model, maxOutputTokens: 100, prompt: "What is the weather in Paris right now?",
  tools: { get_weather: tool({ description: "Get the current weather in a city",
                               inputSchema: z.object({ city: z.string().max(30) }),
                               execute: async ({ city }) => { ran.push(city);
                                                              return `sunny in ${city}`; } }) },
  toolChoice: "required", stopWhen: stepCountIs(2) });
console.log(JSON.stringify({ whole: whole.text, streamed, parts,
                             responseId: whole.response.id, ran,
                             steps: called.steps.map((s) => s.toolCalls.length) }));
"""


def test_vercel_ai_sdk_default_provider(live_server: LiveServer, node_openai: Path,
                                        smollm2: ChatModel) -> None:
    script = node_openai / "responses.mjs"
    script.write_text(VERCEL_SCRIPT)
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "BASE_URL": live_server.base_url + "/v1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected, _ = greedy_reference(
        smollm2, [{"role": "user", "content": "What is the capital of France?"}], 24)
    assert result["whole"] == expected and result["streamed"] == expected
    assert result["parts"] > 3 and result["responseId"].startswith("resp_")
    assert result["steps"] == [1, 1] and len(result["ran"]) == 2


def test_codex_cli_completes_a_turn(live_server: LiveServer, node_codex: Path,
                                    tmp_path: Path) -> None:
    """Codex CLI (`codex exec`, non-interactive) with a provider pointed at the server. Its
    web search and multi-agent tools are turned off: those are OpenAI's own tools, which this
    server refuses by name (see docs/integrations.md)."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{SMOL}"\nmodel_provider = "npugate"\nweb_search = "disabled"\n'
        '[agents]\nenabled = false\n[model_providers.npugate]\nname = "npugate"\n'
        f'base_url = "{live_server.base_url}/v1"\nwire_api = "responses"\n'
        'env_key = "NPUGATE_KEY"\n')
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([str(node_codex / "node_modules" / ".bin" / "codex"), "exec",
                          "--skip-git-repo-check", "--json", "Say hello."],
                         capture_output=True, text=True, timeout=240, cwd=work,
                         stdin=subprocess.DEVNULL,
                         env={**os.environ, "CODEX_HOME": str(home), "NPUGATE_KEY": "unused"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kinds = [e.get("type") for e in events]
    assert "turn.completed" in kinds, kinds
    messages = [e["item"] for e in events if e.get("type") == "item.completed"
                and e["item"].get("type") == "agent_message"]
    assert messages and messages[-1]["text"]


SHARED = {"api_keys": ("sk-a scope=team", "sk-b scope=team", "sk-c")}


@pytest.mark.anyio
@pytest.mark.app(settings=SHARED, chat=("smollm2",), embedding=())
async def test_keys_configured_to_share_a_scope(app: Any) -> None:
    """Keys given the same `scope=NAME` share the prompt cache and the store (a team's
    common system prompt is read once); a key outside the team sees neither."""
    http = app.test_client()
    body = {"model": SMOL, "instructions": GUIDE * 3, "input": "Hello.", "max_output_tokens": 2}

    async def create(key: str) -> dict[str, Any]:
        resp = await http.post("/v1/responses", json=body,
                               headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200
        return dict(await resp.get_json())

    first = await create("sk-a")
    assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0
    teammate = await create("sk-b")
    assert teammate["usage"]["input_tokens_details"]["cached_tokens"] > 0
    outsider = await create("sk-c")
    assert outsider["usage"]["input_tokens_details"]["cached_tokens"] == 0
    for key, status in (("sk-b", 200), ("sk-c", 404)):
        resp = await http.get(f"/v1/responses/{first['id']}",
                              headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == status


@pytest.mark.anyio
@pytest.mark.app(chat=("phi3",), embedding=())
async def test_a_store_that_fails_loses_no_answer(app: Any) -> None:
    """The answer is served whole and marked `store: false`; reading the store is a 503."""
    from server.responses.services import responses_service

    await responses_service(app).store.db.close()  # every write and read now fails
    http = app.test_client()
    resp = await http.post("/v1/responses", json={"model": "phi3-tiny-random", "input": "hi",
                                                   "max_output_tokens": 3})
    body = await resp.get_json()
    assert resp.status_code == 200 and body["store"] is False and body["output"]
    got = await http.get(f"/v1/responses/{body['id']}")
    assert got.status_code == 503
    assert (await got.get_json())["error"]["code"] == "store_unavailable"
