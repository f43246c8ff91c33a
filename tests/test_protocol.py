from __future__ import annotations

import pytest

from server.errors import APIError
from server.protocol import ChatCompletionRequest, parse_json_body, parse_model

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _parse(**extra: object) -> ChatCompletionRequest:
    return parse_model(ChatCompletionRequest, {**BASE, **extra})


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
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
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
