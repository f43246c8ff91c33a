"""Structured outputs, tool calls and logprobs through the official `openai` SDK against a real
server on SmolLM2 (grammar-constrained decoding with llguidance)."""

from __future__ import annotations

import enum
import json
import math
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionTokenLogprob
from pydantic import BaseModel, Field

from server.openai.tools import strict_arguments
from tests.conftest import LiveServer

SMOL = "smollm2-135m-instruct"
PHI3 = "phi3-tiny-random"
# Strings carry a maxLength: a 135M model left to end a free string by itself sometimes
# repeats a word until max_tokens (the grammar keeps it valid JSON, not finite).
Short = Annotated[str, Field(max_length=24)]


class Color(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: Short
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: Short
    age: int = Field(ge=0, le=120)
    favourite_color: Color
    hobbies: list[Short] = Field(min_length=1, max_length=3)
    rating: float = Field(ge=0, le=5)
    nickname: Short | None = None
    address: Address


class Recipe(BaseModel):
    title: Short
    course: Literal["starter", "main", "dessert"]
    minutes: int = Field(ge=1, le=600)
    ingredients: list[Short] = Field(min_length=2, max_length=4)
    vegetarian: bool


SUBJECTS = ["a baker in Paris", "a pilot", "a retired teacher", "a young painter",
            "a chess champion", "a farmer", "a doctor in Berlin", "a student", "a musician",
            "a software engineer", "a gardener", "a sailor"]
DISHES = ["pancakes", "tomato soup", "apple pie", "a green salad", "chili", "risotto",
          "lemon cake", "fried rice", "pea soup", "a cheese omelette"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused",
                         max_retries=0, timeout=120)


def test_parse_returns_an_object_for_every_prompt(client: openai.OpenAI) -> None:
    """Nested objects, enums, bounded arrays, numbers with limits, optional fields and
    patterned strings, over 22 prompts: every answer parses and validates."""
    cases: list[tuple[type[BaseModel], str]] = \
        [(Person, f"Invent a person: {s}.") for s in SUBJECTS] + \
        [(Recipe, f"Give me a recipe for {d}.") for d in DISHES]
    for model, prompt in cases:
        resp = client.chat.completions.parse(
            model=SMOL, messages=[{"role": "user", "content": prompt}], response_format=model,
            temperature=0, max_tokens=300)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        assert isinstance(choice.message.parsed, model), prompt


def test_json_object_and_sampled_schema_answers(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "What is the capital of France? "
                                                         'Answer as {"capital": ...}.'}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].message.content or ""), dict)
    schema = Recipe.model_json_schema()
    for seed in range(3):  # sampled, not only greedy
        resp = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "A recipe for soup, please."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "recipe", "schema": schema, "strict": True}},
            temperature=1.0, seed=seed, max_tokens=300)
        if resp.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(resp.choices[0].message.content or ""), schema)


def test_streamed_schema_answer_matches_the_whole_one(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {
        "name": "recipe", "schema": Recipe.model_json_schema(), "strict": True}}
    messages = [{"role": "user", "content": "A recipe for pancakes."}]
    whole = client.chat.completions.create(model=SMOL, messages=messages,  # type: ignore
                                           response_format=fmt, temperature=0, max_tokens=300)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=SMOL, messages=messages, response_format=fmt, temperature=0,  # type: ignore
        max_tokens=300, stream=True) if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    Recipe.model_validate_json("".join(pieces))


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"type": "string", "pattern": "(("},
    {"type": "wibble"},
])
def test_a_schema_the_library_cannot_compile_gets_400(client: openai.OpenAI,
                                                      schema: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=SMOL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": schema}})
    assert err.value.body["param"] == "response_format"  # type: ignore[index]
    assert "cannot be used" in err.value.body["message"]  # type: ignore[index]


def _arguments_valid(call_args: str, tool: dict) -> None:  # type: ignore[type-arg]
    """The arguments hold the function's properties and nothing else: every object in the
    schema closed, as OpenAI's strict mode reads it."""
    closed = strict_arguments(tool["function"]["parameters"])
    jsonschema.validate(json.loads(call_args), closed)


def test_streamed_tool_call_assembles_into_valid_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=SMOL, messages=ASK,  # type: ignore[arg-type]
                                            tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=100, stream=True)
    calls: dict[int, dict[str, str]] = {}
    first_fragments, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or ():
                if piece.id is not None:  # a call's first fragment: id, type, name
                    assert piece.type == "function" and piece.function and piece.function.name
                    first_fragments.append(piece.index)
                    calls[piece.index] = {"name": piece.function.name, "args": ""}
                calls[piece.index]["args"] += (piece.function and piece.function.arguments) or ""
    assert finish == "tool_calls"
    assert first_fragments == sorted(calls) and calls
    for call in calls.values():
        assert call["name"] == "get_weather"
        _arguments_valid(call["args"], WEATHER)


def test_tool_choice_none_required_and_named_are_obeyed(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(model=SMOL, messages=ASK,  # type: ignore[arg-type]
                                          tools=[WEATHER, TIME], tool_choice="none",
                                          temperature=0, max_tokens=30)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    # required: one call unless parallel calls are asked for
    required = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=[WEATHER, TIME],  # type: ignore[arg-type]
        tool_choice="required", temperature=0, max_tokens=100)
    assert required.choices[0].finish_reason == "tool_calls"
    assert len(required.choices[0].message.tool_calls or []) == 1
    for call in required.choices[0].message.tool_calls or []:
        assert call.function.name in ("get_weather", "get_time")
    parallel = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=[WEATHER, TIME], temperature=0,  # type: ignore
        max_tokens=200, tool_choice="required", parallel_tool_calls=True)
    assert 1 <= len(parallel.choices[0].message.tool_calls or []) <= 8
    # a named function: exactly one call, even when parallel calls are asked for
    for flag in (None, True, False):
        extra = {} if flag is None else {"parallel_tool_calls": flag}
        named = client.chat.completions.create(
            model=SMOL, messages=ASK, tools=[WEATHER, TIME], temperature=0,  # type: ignore
            max_tokens=100, tool_choice={"type": "function", "function": {"name": "get_time"}},
            **extra)
        calls = named.choices[0].message.tool_calls
        assert calls and len(calls) == 1 and calls[0].function.name == "get_time"
        assert named.choices[0].message.content is None
        assert named.choices[0].finish_reason == "tool_calls"
        _arguments_valid(calls[0].function.arguments, TIME)


def test_open_argument_schemas_get_only_their_properties(client: openai.OpenAI) -> None:
    """A schema that leaves additionalProperties open (as LangChain's and most agents' do)
    gets arguments with its own properties only, never the schema's words as extra keys."""
    convert = {"type": "function", "function": {
        "name": "convert", "description": "Convert an amount from one unit to another",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "integer", "minimum": 0, "maximum": 100000},
            "source": {"type": "string", "maxLength": 20},
            "target": {"type": "string", "maxLength": 20},
            "options": {"type": "object", "properties": {"round": {"type": "boolean"}}}},
            "required": ["amount", "source", "target"]}}}
    for ask in ("Convert 12 miles to kilometres.", "How many pounds is 3 kg?"):
        done = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": ask}],
            tools=[convert], tool_choice="required", temperature=0,  # type: ignore[list-item]
            max_tokens=120)
        calls = done.choices[0].message.tool_calls or []
        assert len(calls) == 1 and done.choices[0].finish_reason == "tool_calls"
        _arguments_valid(calls[0].function.arguments, convert)


def test_auto_answers_in_text_or_calls_and_a_round_trip_completes(
        client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=SMOL, messages=ASK,  # type: ignore[arg-type]
                                           tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=100)
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 18, "sky": "cloudy"})}]
    second = client.chat.completions.create(model=SMOL, messages=history,  # type: ignore
                                            tools=[WEATHER], temperature=0, max_tokens=60)
    choice = second.choices[0]
    # `auto`: the grammar allows text or calls, and the answer is one of them, whole
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _arguments_valid(choice.message.tool_calls[0].function.arguments, WEATHER)
    else:
        assert choice.message.content and not choice.message.content.startswith("{")
    # the tool result reached the prompt: it costs tokens
    assert second.usage and first.usage
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


def _nested(depth: int) -> dict:  # type: ignore[type-arg]
    schema: dict = {"type": "integer"}  # type: ignore[type-arg]
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_tool_errors_are_400s(client: openai.OpenAI) -> None:
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}},
          "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools.0.function.name"),
        ({"tools": [WEATHER], "messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": _nested(40)}}}, "response_format.json_schema.schema"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=SMOL, **{"messages": ASK, "max_tokens": 5,
                                                          **extra})
        assert err.value.body["param"] == param, extra  # type: ignore[index]


def test_tool_calls_over_the_websocket(live_server: LiveServer) -> None:
    from websockets.sync.client import connect

    url = live_server.base_url.replace("http", "ws") + "/v1/ws"
    with connect(url) as ws:
        ws.send(json.dumps({"type": "chat.create", "id": "t", "request": {
            "model": SMOL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0, "max_tokens": 100}}))
        args, names = "", []
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "chat.done":
                break
            assert msg["type"] == "chat.delta", msg
            for piece in msg["chunk"]["choices"][0]["delta"].get("tool_calls", ()):
                if "id" in piece:
                    names.append(piece["function"]["name"])
                args += piece["function"]["arguments"]
    assert msg["finish_reason"] == "tool_calls" and names[0] == "get_weather"
    _arguments_valid(args if len(names) == 1 else args[:args.index("}") + 1], WEATHER)


def test_logprobs_arrive_in_the_sdks_types(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=SMOL, messages=ASK,  # type: ignore[arg-type]
                                           logprobs=True, top_logprobs=5, temperature=0,
                                           max_tokens=8)
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content and len(content) == 8
    text = "".join(bytes(e.bytes or []).decode("utf-8", "replace") for e in content)
    assert text == whole.choices[0].message.content
    for entry in content:
        assert isinstance(entry, ChatCompletionTokenLogprob)
        assert len(entry.top_logprobs) == 5
        # greedy: the chosen token is the most likely, and the top five are a distribution's
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0001
    streamed = [e for chunk in client.chat.completions.create(
        model=SMOL, messages=ASK, logprobs=True, top_logprobs=5,  # type: ignore[arg-type]
        temperature=0, max_tokens=8, stream=True)
        for c in chunk.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_logprobs_follow_the_grammar_mask(client: openai.OpenAI,
                                          live_server: LiveServer) -> None:
    """Under a grammar, the distribution reported is the masked one: where the grammar
    allows one token, it has probability 1. Mask fills are timed in /metrics."""

    def masks_timed() -> float:
        text = httpx.get(live_server.base_url + "/metrics", timeout=10).text
        line = next((x for x in text.splitlines() if x.startswith(
            f'npugate_grammar_mask_seconds_count{{model="{SMOL}"}}')), None)
        return float(line.split()[-1]) if line else 0.0

    before = masks_timed()
    resp = client.chat.completions.create(
        model=SMOL, messages=ASK, logprobs=True, top_logprobs=3, temperature=0,
        max_tokens=100, response_format={"type": "json_schema", "json_schema": {
            "name": "w", "schema": {"type": "object", "properties": {
                "sky": {"type": "string", "enum": ["sunny", "cloudy"]}},
                "required": ["sky"], "additionalProperties": False}}})
    content = resp.choices[0].logprobs and resp.choices[0].logprobs.content
    assert content
    assert content[0].logprob == pytest.approx(0.0)  # `{"` is the only way to start
    assert json.loads(resp.choices[0].message.content or "")["sky"] in ("sunny", "cloudy")
    # every token after the first (whose mask is computed with the matcher) was masked on
    # the device thread and timed
    assert resp.usage is not None
    assert masks_timed() - before == resp.usage.completion_tokens - 1


def test_phi3_eos_and_special_tokens_under_a_grammar(live_server: LiveServer) -> None:
    """Phi-3 ends turns with <|end|> (32007), which llguidance does not know as eos by
    itself: a finished grammar must stop with "stop", never run on into special tokens."""
    body = {"model": PHI3, "messages": ASK, "temperature": 0, "max_tokens": 60,
            "logprobs": True, "response_format": {"type": "json_schema", "json_schema": {
                "name": "w", "schema": {"type": "object", "properties": {
                    "ok": {"type": "boolean"}}, "required": ["ok"],
                    "additionalProperties": False}}}}
    resp = httpx.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) in ({"ok": True}, {"ok": False})
    tokens = [e["token"] for e in choice["logprobs"]["content"]]
    assert not any(t.startswith("<|") for t in tokens), tokens
