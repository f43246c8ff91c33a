"""Tool-call text to OpenAI deltas, however the text is split; the tool grammar; sampling
under a mask, and the log-probabilities reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference.chat.grammar import Guide
from inference.chat.model import ChatModel
from inference.chat.sampling import Sampler, SamplingParams
from server.openai.tools import ToolCallParser, prompt_messages, strict_arguments, tool_grammar

CALLS = ('{"tool_calls":[{"name":"get_weather","arguments":{"city":"Pa\\"ris}","n":[1,{"a":2}]}},'
         '{"name":"get_time","arguments":{}}]}')


def _run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[dict]]:  # type: ignore[type-arg]
    text, deltas = "", []
    for piece in pieces:
        t, d = parser.feed(piece)
        text += t
        deltas += d
    return text + parser.finish(), deltas


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_parse_the_same_however_the_text_is_split(size: int) -> None:
    pieces = [CALLS[i:i + size] for i in range(0, len(CALLS), size)]
    text, deltas = _run(ToolCallParser("auto"), pieces)
    assert text == ""
    firsts = [d for d in deltas if "id" in d]
    assert [d["function"]["name"] for d in firsts] == ["get_weather", "get_time"]
    assert [d["index"] for d in firsts] == [0, 1]
    args: dict[int, str] = {}
    for d in deltas:
        args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    assert json.loads(args[0]) == {"city": 'Pa"ris}', "n": [1, {"a": 2}]}
    assert json.loads(args[1]) == {}


@pytest.mark.parametrize("answer", ["Hello there", "{not a call", "{", "{\"tool"])
def test_auto_text_passes_through_whole(answer: str) -> None:
    text, deltas = _run(ToolCallParser("auto"), list(answer))
    assert text == answer and deltas == []


def test_round_trip_messages_are_written_as_the_model_writes_calls() -> None:
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    out = prompt_messages(history, native=False, preamble="TOOLS")
    assert out[0] == {"role": "system", "content": "TOOLS"}
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert out[3] == {"role": "user", "content": "Result of get_weather: 18C"}
    assert prompt_messages(history, native=True, preamble=None) == history


def test_tool_grammar_accepts_calls_and_refuses_other_functions(smollm2: ChatModel) -> None:
    fns = [{"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}, {"name": "get_time"}]
    guide = smollm2.guide
    enc = smollm2.tokenizer.encode

    def accepts(grammar: str, text: str) -> bool:
        m = guide.matchers(grammar, 1, param="tools")[0].matcher
        ids = enc(text, add_special_tokens=False).ids
        return bool(m.try_consume_tokens(ids) == len(ids))

    required = tool_grammar(fns, "required", parallel=True)
    assert accepts(required, CALLS.replace(',"n":[1,{"a":2}]', "").replace('Pa\\"ris}', "X"))
    assert not accepts(required, "Hello")
    assert not accepts(required, '{"tool_calls":[{"name":"rm_rf","arguments":{}}]}')
    single = tool_grammar(fns, "required", parallel=False)
    assert not accepts(single, '{"tool_calls":[{"name":"get_time","arguments":{}},')
    auto = tool_grammar(fns, "auto", parallel=True)
    assert accepts(auto, "Hello") and accepts(auto, '{"tool_calls":[')


def test_tool_arguments_are_read_as_strict_mode_reads_them(smollm2: ChatModel) -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {"type": "object", "properties": {
        "where": point, "tags": {"type": "array", "items": point},
        "either": {"anyOf": [point, {"type": "null"}]}, "ref": {"$ref": "#/$defs/p"},
        "free": {"type": "object", "additionalProperties": True}},
        "$defs": {"p": point}}
    strict = strict_arguments(schema)
    closed = {**point, "additionalProperties": False}
    assert strict["additionalProperties"] is False
    props = strict["properties"]
    assert props["where"] == closed and props["tags"]["items"] == closed
    assert props["either"]["anyOf"] == [closed, {"type": "null"}]
    assert strict["$defs"]["p"] == closed and props["ref"] == {"$ref": "#/$defs/p"}
    assert props["free"]["additionalProperties"] is True  # set by the schema: kept
    assert schema["properties"]["where"] == point  # the request's schema is not changed
    # the grammar refuses a key the schema does not name, where it left the object open
    grammar = tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}], "required", parallel=False)
    m = smollm2.guide.matchers(grammar, 1, param="tools")[0].matcher
    ids = smollm2.tokenizer.encode('{"tool_calls":[{"name":"f","arguments":{"city":"P",'
                                   '"type"', add_special_tokens=False).ids
    assert m.try_consume_tokens(ids) < len(ids)


def test_logprobs_are_a_distribution_after_penalties_and_mask(smollm2: ChatModel) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=smollm2.vocab_size).astype(np.float32) * 4
    allowed = np.zeros(smollm2.vocab_size, dtype=bool)
    allowed[[5, 17, 400, 9000]] = True
    sampler = Sampler(SamplingParams(temperature=0.7, logprobs=True, top_logprobs=20,
                                     presence_penalty=1.0, seed=1), smollm2.vocab_size)
    for _ in range(5):
        token = sampler.sample(logits, allowed)
        assert allowed[token]
        got = sampler.last
        assert got is not None and got.token == token
        # only the four allowed tokens have probability, and it sums to 1
        assert sorted(t for t, _ in got.top) == [5, 17, 400, 9000]
        assert sum(math.exp(lp) for _, lp in got.top) == pytest.approx(1.0)
    greedy = Sampler(SamplingParams(temperature=0, logprobs=True, top_logprobs=2),
                     smollm2.vocab_size)
    token = greedy.sample(logits, allowed)
    assert greedy.last is not None and greedy.last.top[0][0] == token


def test_guide_knows_the_models_own_eos(phi3: ChatModel) -> None:
    guide = Guide(phi3.tokenizer, phi3.vocab_size, phi3.spec.eos_token_ids)
    assert sorted(guide.tokenizer.eos_tokens) == sorted(phi3.spec.eos_token_ids)
    assert 32007 in guide.tokenizer.eos_tokens  # <|end|>, which llguidance misses by itself
    assert guide.token_bytes(32007) == b"<|end|>"
    m = guide.matchers('start: "ok"\n', 1, param="x")[0]
    m.consume(phi3.tokenizer.token_to_id("ok") or phi3.tokenizer.encode(
        "ok", add_special_tokens=False).ids[0])
    allowed = guide.fill([m.matcher])[0]
    assert m.done or set(np.nonzero(allowed)[0]) <= set(phi3.spec.eos_token_ids)
