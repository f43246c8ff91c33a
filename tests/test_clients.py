"""Client libraries nobody here wrote, against `npugate serve` on a real loopback socket:
LangChain (`langchain-openai`), LiteLLM and the official Node SDK: their answers in depth
(docs/integrations.md's snippets for them run in tests/test_docs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest

from inference.chat.model import ChatModel
from tests.conftest import LiveServer, greedy_reference

SMOL = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
FRANCE = "What is the capital of France?"


def _direct_embedding(server: LiveServer, text: str) -> np.ndarray:
    resp = httpx.post(server.base_url + "/v1/embeddings", json={"model": MINILM, "input": text},
                      timeout=30)
    return np.asarray(resp.json()["data"][0]["embedding"])


# --- LangChain ----------------------------------------------------------------------------

def _answer(model: ChatModel) -> str:
    """The greedy 24-token answer to FRANCE that each client below must receive."""
    return greedy_reference(model, [{"role": "user", "content": FRANCE}], 24)[0]


def test_langchain_chat_streaming_and_embeddings(live_server: LiveServer,
                                                 smollm2: ChatModel) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    chat = ChatOpenAI(model=SMOL, base_url=live_server.base_url + "/v1", api_key="unused",
                      temperature=0, max_completion_tokens=24)
    answer = chat.invoke(FRANCE)
    assert answer.content == _answer(smollm2)
    pieces = [str(chunk.content) for chunk in chat.stream(FRANCE)]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == answer.content
    # LangChain's default sends OpenAI's own token ids (tiktoken), which this model would
    # read as other tokens; check_embedding_ctx_length=False sends the text
    embeddings = OpenAIEmbeddings(model=MINILM, base_url=live_server.base_url + "/v1",
                                  api_key="unused", check_embedding_ctx_length=False)
    vectors = embeddings.embed_documents(["a lighthouse", "the sea"])
    query = embeddings.embed_query("a lighthouse")
    assert len(vectors) == 2 and len(query) == 384
    np.testing.assert_allclose(query, _direct_embedding(live_server, "a lighthouse"), atol=1e-6)
    np.testing.assert_allclose(vectors[0], query, atol=1e-6)


# --- LiteLLM ------------------------------------------------------------------------------

# LiteLLM runs in its own process, as an application would: it leaves event loops and pooled
# connections open at exit, which pytest would report in whichever later test collects them.
LITELLM_SCRIPT = """
import json, os, sys
import litellm

base, smol, minilm = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {"api_base": base, "api_key": "unused", "temperature": 0, "max_tokens": 24}
messages = [{"role": "user", "content": "What is the capital of France?"}]
whole = litellm.completion(model=f"openai/{smol}", messages=messages, **kwargs)
streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
    model=f"openai/{smol}", messages=messages, stream=True, **kwargs))
legacy = litellm.text_completion(model=f"text-completion-openai/{smol}",
                                 prompt="The capital of France is", **kwargs)
emb = litellm.embedding(model=f"openai/{minilm}", input=["a lighthouse"], api_base=base,
                        api_key="unused")
print(json.dumps({"text": whole.choices[0].message.content, "streamed": streamed,
                  "legacy": legacy.choices[0].text, "embedding": emb.data[0]["embedding"]}))
"""


def test_litellm_chat_stream_text_completion_and_embeddings(live_server: LiveServer,
                                                            smollm2: ChatModel) -> None:
    out = subprocess.run(
        [sys.executable, "-c", LITELLM_SCRIPT, live_server.base_url + "/v1", SMOL, MINILM],
        capture_output=True, text=True, timeout=120,
        # LiteLLM fetches a model price list from the network at import unless told not to
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] == _answer(smollm2) and result["streamed"] == result["text"]
    assert result["legacy"]
    np.testing.assert_allclose(result["embedding"],
                               _direct_embedding(live_server, "a lighthouse"), atol=1e-6)


# --- the official Node SDK -----------------------------------------------------------------

NODE_SCRIPT = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "What is the capital of France?" }];
const whole = await client.chat.completions.create({
  model: "smollm2-135m-instruct", messages, temperature: 0, max_tokens: 24 });
let streamed = "";
const stream = await client.chat.completions.create({
  model: "smollm2-135m-instruct", messages, temperature: 0, max_tokens: 24, stream: true,
  stream_options: { include_usage: true } });
let usage = null;
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
const emb = await client.embeddings.create({ model: "all-minilm-l6-v2", input: "a lighthouse" });
let status = null;
try {
  await client.chat.completions.create({ model: "smollm2-135m-instruct", messages,
                                         max_tokens: 1000000 });
} catch (err) {
  status = { status: err.status, param: err.param,
             isBadRequest: err instanceof OpenAI.BadRequestError };
}
console.log(JSON.stringify({ text: whole.choices[0].message.content, streamed, usage,
                             dims: emb.data[0].embedding.length, first: emb.data[0].embedding[0],
                             error: status }));
"""


def test_node_sdk(live_server: LiveServer, node_openai: Path, smollm2: ChatModel) -> None:
    script = node_openai / "check.mjs"
    script.write_text(NODE_SCRIPT)
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BASE_URL": live_server.base_url + "/v1"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == _answer(smollm2) and result["streamed"] == result["text"]
    assert result["usage"]["completion_tokens"] > 0
    assert result["dims"] == 384
    assert result["first"] == pytest.approx(float(_direct_embedding(live_server,
                                                                    "a lighthouse")[0]))
    assert result["error"] == {"status": 400, "param": "max_tokens", "isBadRequest": True}


def test_langchain_structured_output_and_tools(live_server: LiveServer) -> None:
    """`with_structured_output` (json_schema) and `bind_tools` with a forced tool, as agent
    code written for OpenAI uses them."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        country: str = Field(max_length=30)
        capital: str = Field(max_length=30)

    chat = ChatOpenAI(model=SMOL, base_url=live_server.base_url + "/v1", api_key="unused",
                      temperature=0, max_completion_tokens=120)
    parsed = chat.with_structured_output(Capital, method="json_schema").invoke(FRANCE)
    assert isinstance(parsed, Capital) and parsed.capital

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    calls = message.tool_calls  # type: ignore[attr-defined]
    assert calls and calls[0]["name"] == "get_weather"
    assert isinstance(calls[0]["args"].get("city"), str) and calls[0]["id"]


def test_langchain_strict_named_binding_gets_one_valid_call(live_server: LiveServer) -> None:
    """`bind_tools(strict=True, tool_choice=name)`: exactly one call, whose arguments hold the
    function's properties and nothing else (it once got several, the last one `{}`). The
    strings are bounded, as docs/integrations.md advises: a 135M model may write an unbounded
    one until max_tokens."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class ConvertUnits(BaseModel):
        """Convert an amount from one unit to another."""

        amount: int = Field(ge=0, le=100000)
        source: str = Field(max_length=20)
        target: str = Field(max_length=20)

    chat = ChatOpenAI(model=SMOL, base_url=live_server.base_url + "/v1", api_key="unused",
                      temperature=0, max_completion_tokens=120)
    bound = chat.bind_tools([ConvertUnits], tool_choice="ConvertUnits", strict=True)
    for ask in ("Convert 12 miles to kilometres.", "How many pounds is 3 kg?"):
        message = bound.invoke(ask)
        calls = message.tool_calls  # type: ignore[attr-defined]
        assert len(calls) == 1 and calls[0]["name"] == "ConvertUnits"
        args = calls[0]["args"]
        assert set(args) == {"amount", "source", "target"}, args
        assert isinstance(args["amount"], int) and isinstance(args["source"], str)


# instructor in its default TOOLS mode (a named tool whose parameters are the response model's
# schema), from its own virtual environment: its pins clash with the dev environment's openai
INSTRUCTOR_SCRIPT = """
import json, sys
import instructor
from openai import OpenAI
from pydantic import BaseModel, Field

class UserInfo(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=150)

client = instructor.from_openai(OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0))
assert client.mode == instructor.Mode.TOOLS
user, completion = client.chat.completions.create_with_completion(
    model=sys.argv[2], response_model=UserInfo, temperature=0, max_tokens=60, max_retries=0,
    messages=[{"role": "user", "content": "John Doe is 30 years old."}])
calls = completion.choices[0].message.tool_calls
print(json.dumps({"user": user.model_dump(), "schema": UserInfo.model_json_schema(),
                  "calls": [json.loads(c.function.arguments) for c in calls],
                  "finish": completion.choices[0].finish_reason}))
"""


def test_instructor_tools_mode_returns_its_object(live_server: LiveServer,
                                                  instructor_python: Path) -> None:
    """instructor's default mode once got IncompleteOutputException: several calls, the last
    cut off at max_tokens. Now one call, whose arguments hold the model's fields only."""
    out = subprocess.run([str(instructor_python), "-c", INSTRUCTOR_SCRIPT,
                          live_server.base_url + "/v1", SMOL],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["calls"]) == 1 and result["finish"] in ("stop", "tool_calls")
    closed = {**result["schema"], "additionalProperties": False}
    jsonschema.validate(result["calls"][0], closed)
    assert result["user"] == result["calls"][0]


# The OpenAI Agents SDK, on chat completions (its Responses path waits for /v1/responses), in
# its own process: it keeps event loops and its tracing thread to the end.
AGENTS_SCRIPT = """
import json, sys
from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                    set_tracing_disabled)
from openai import AsyncOpenAI

set_tracing_disabled(True)  # else it exports traces to OpenAI
base, smol = sys.argv[1], sys.argv[2]
ran = []

@function_tool
def get_weather(city: str) -> str:
    '''Get the current weather in a city.'''
    ran.append(city)
    return f"sunny and 21 C in {city}"

model = OpenAIChatCompletionsModel(model=smol, openai_client=AsyncOpenAI(
    base_url=base, api_key="unused", max_retries=0))
# After a call the SDK resets tool_choice to auto, where this model calls the tool again
# whenever a call is in the conversation: the agent stops at its first tool's result
agent = Agent(name="weather", instructions="Answer with the weather tool.", model=model,
              tools=[get_weather], tool_use_behavior="stop_on_first_tool",
              model_settings=ModelSettings(tool_choice="required", temperature=0,
                                           max_tokens=100))
result = Runner.run_sync(agent, "What is the weather in Paris right now?", max_turns=6)
calls = [item for item in result.new_items if item.type == "tool_call_item"]
print(json.dumps({"ran": ran, "calls": len(calls), "turns": len(result.raw_responses),
                  "output": str(result.final_output)}))
"""


def test_agents_sdk_with_a_required_tool_finishes_within_its_turns(
        live_server: LiveServer) -> None:
    """`tool_choice="required"` once ran the tool 20 times and raised MaxTurnsExceeded: each
    answer held several calls. Now the model's turn makes one call, which the tool runs once,
    and the run ends with its result."""
    out = subprocess.run([sys.executable, "-c", AGENTS_SCRIPT, live_server.base_url + "/v1",
                          SMOL], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["turns"] == 1 and result["calls"] == 1 and len(result["ran"]) == 1
    assert isinstance(result["ran"][0], str) and result["ran"][0]
    assert result["output"] == f"sunny and 21 C in {result['ran'][0]}"


# The Node SDK's zodFunction (strict tools, parsed arguments) with a named tool, and the Vercel
# AI SDK's tool loop with toolChoice "required", on chat completions
NODE_TOOLS_SCRIPT = """
import OpenAI from "openai";
import { zodFunction } from "openai/helpers/zod";
import { z } from "zod";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, tool } from "ai";

const base = process.env.BASE_URL;
const client = new OpenAI({ baseURL: base, apiKey: "unused", maxRetries: 0 });
const Convert = z.object({ amount: z.number().int().min(0).max(100000),
                           source: z.string().max(20), target: z.string().max(20) });
const parsed = await client.chat.completions.parse({
  model: "smollm2-135m-instruct", temperature: 0, max_tokens: 120,
  messages: [{ role: "user", content: "Convert 12 miles to kilometres." }],
  tools: [zodFunction({ name: "convert_units", parameters: Convert })],
  tool_choice: { type: "function", function: { name: "convert_units" } } });
const calls = parsed.choices[0].message.tool_calls;

const provider = createOpenAI({ baseURL: base, apiKey: "unused" });
const ran = [];
const result = await generateText({
  model: provider.chat("smollm2-135m-instruct"), temperature: 0, maxOutputTokens: 100,
  prompt: "What is the weather in Paris right now?",
  tools: { get_weather: tool({ description: "Get the current weather in a city",
                               inputSchema: z.object({ city: z.string().max(30) }),
                               execute: async ({ city }) => { ran.push(city);
                                                              return `sunny in ${city}`; } }) },
  toolChoice: "required", stopWhen: stepCountIs(2) });
console.log(JSON.stringify({
  zod: { calls: calls.length, name: calls[0].function.name,
         parsed: calls[0].function.parsed_arguments },
  ai: { steps: result.steps.map((s) => s.toolCalls.length), ran } }));
"""


def test_node_zod_function_and_the_vercel_ai_sdk_make_one_call_per_step(
        live_server: LiveServer, node_openai: Path) -> None:
    """zodFunction with a named tool once got LengthFinishReasonError (many calls, the last
    cut off); the AI SDK with toolChoice "required" got 5 to 8 identical calls per step."""
    script = node_openai / "tools.mjs"
    script.write_text(NODE_TOOLS_SCRIPT)
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "BASE_URL": live_server.base_url + "/v1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["zod"]["calls"] == 1 and result["zod"]["name"] == "convert_units"
    assert set(result["zod"]["parsed"]) == {"amount", "source", "target"}
    assert result["ai"]["steps"] == [1, 1] and len(result["ai"]["ran"]) == 2
