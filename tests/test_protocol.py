from __future__ import annotations

import pytest
from pydantic import BaseModel

from server.core.errors import APIError
from server.core.http import parse_json_body
from server.openai.wire import (
    ChatCompletionRequest,
    ChatMessage,
    EmbeddingRequest,
    ResponseFormat,
    StreamOptions,
    parse_model,
)

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _parse(**extra: object) -> ChatCompletionRequest:
    return parse_model(ChatCompletionRequest, {**BASE, **extra})


def test_tools_with_tool_choice_none_or_empty_are_fine() -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    _parse(tools=[tool], tool_choice="none").check_supported()
    _parse(tools=[]).check_supported()


def test_unknown_fields_are_ignored() -> None:
    req = _parse(user="u1", logit_bias={"1": 2}, parallel_tool_calls=False,
                 stream_options={"include_usage": True, "future": 1}, stream=True)
    assert req.include_usage()


def test_text_parts_are_joined_and_other_parts_rejected() -> None:
    req = _parse(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "a\nb"
    req = _parse(messages=[{"role": "user", "content": [{"type": "image_url",
                                                         "image_url": {"url": "x"}}]}])
    with pytest.raises(APIError, match="text parts only"):
        req.messages[0].text()


@pytest.mark.parametrize(("extra", "param"), [
    ({"messages": []}, "messages"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"model": 5}, "model"),
])
def test_invalid_fields_name_their_param(extra: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as err:
        _parse(**extra)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
])
def test_unsupported_options_are_rejected_clearly(extra: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as err:
        _parse(**extra).check_supported()
    assert err.value.param == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b"\xff\xfe", b"null"])
def test_bodies_that_are_not_json_objects(raw: bytes) -> None:
    with pytest.raises(APIError) as err:
        parse_json_body(raw)
    assert err.value.status == 400


def _optional_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.is_required()]


@pytest.mark.parametrize(("model", "valid"), [
    (ChatCompletionRequest, BASE),
    (EmbeddingRequest, {"model": "m", "input": "hello"}),
    (ChatMessage, {"role": "user"}),
    (StreamOptions, {}),
    (ResponseFormat, {}),
])
def test_explicit_null_means_unset_on_every_optional_field(model: type[BaseModel],
                                                           valid: dict[str, object]) -> None:
    # derived from the models, so a field added later is covered too
    fields = _optional_fields(model)
    assert fields
    unset = parse_model(model, valid)
    for name in fields:
        assert parse_model(model, {**valid, name: None}) == unset, name
    assert parse_model(model, {**valid, **dict.fromkeys(fields)}) == unset


def test_required_fields_still_refuse_null() -> None:
    with pytest.raises(APIError) as err:
        _parse(model=None)
    assert err.value.param == "model"


@pytest.mark.parametrize(("bias", "message"), [
    ({"abc": 1}, "token ids"),
    ({"-1": 1}, "token ids"),
    ({"5": 101}, "outside -100 to 100"),
    ({"5": -100.5}, "outside -100 to 100"),
    ({str(i): 1 for i in range(301)}, "at most 300"),
    ({"5": "1"}, "valid number"),
])
def test_logit_bias_is_checked(bias: dict[str, object], message: str) -> None:
    with pytest.raises(APIError, match=message) as err:
        _parse(logit_bias=bias)
    assert (err.value.param or "").startswith("logit_bias")
    assert _parse(logit_bias={"5": -100, "7": 100.0}).logit_bias_pairs() == ((5, -100), (7, 100.0))
