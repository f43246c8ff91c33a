"""What a JSON schema may ask of the grammar engine: budget, bounds, and an end."""

from __future__ import annotations

from typing import Any

import pytest

from inference.chat.schema_check import MAX_OPTIONAL_PROPERTIES, MAX_PROPERTIES, check_schema
from inference.errors import InvalidInput


def _props(n: int, *, required: bool) -> dict[str, Any]:
    names = [f"p{i}" for i in range(n)]
    schema: dict[str, Any] = {"type": "object",
                              "properties": {p: {"type": "string"} for p in names}}
    if required:
        schema["required"] = names
    return schema


def _nested(levels: int) -> dict[str, Any]:
    props: dict[str, Any] = {f"f{i}": {"type": "string"} for i in range(49)}
    if levels > 1:
        props["child"] = _nested(levels - 1)
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


@pytest.mark.parametrize("schema", [
    _props(MAX_PROPERTIES, required=True),  # OpenAI's own limit, strict: 0.3 s to compile
    _props(MAX_OPTIONAL_PROPERTIES, required=False),
    _nested(10),  # ten levels of fifty fields, as pydantic writes them
    {"type": "object", "properties": {"next": {"$ref": "#"}}},  # optional recursion ends
    {"$defs": {"node": {"type": "object", "required": ["kids"], "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},  # a tree: an empty list ends it
    {"$defs": {"link": {"type": "object", "required": ["next"], "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/link"}, {"type": "null"}]}}}},
     "$ref": "#/$defs/link"},  # a linked list ends in null
    {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    {"type": "number", "minimum": 1e40},  # floats are not held in 64-bit integers
    # whatever a client puts in `required` (once a TypeError: a 500)
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": [{}, 1, "a"]},
])
def test_what_sdks_write_passes(schema: dict[str, Any]) -> None:
    check_schema(schema, param="response_format")


@pytest.mark.parametrize(("schema", "message"), [
    (_props(4000, required=False), "4000 optional properties; this server compiles at most"),
    (_props(MAX_PROPERTIES + 1, required=True), "compiles at most 5000"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1e40,
                                             "maximum": 1e40 + 5}}},
     "outside what the grammar engine can enforce"),
    ({"type": "integer", "maximum": 2**64}, "outside what the grammar engine can enforce"),
    ({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
     "no finite value"),
    ({"$ref": "#"}, "no finite value"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "array", "minItems": 1,
                                                    "items": {"$ref": "#/$defs/a"}}},
      "$ref": "#/$defs/a"}, "no finite value"),
])
def test_what_cannot_be_compiled_enforced_or_finished_is_refused(schema: dict[str, Any],
                                                                message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as err:
        check_schema(schema, param="tools")
    assert err.value.param == "tools"
