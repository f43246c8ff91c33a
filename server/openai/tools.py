"""Tool calling for models without a tool-call format of their own, made reliable by a grammar.

The model writes its calls as one JSON object, `{"tool_calls":[{"name":...,"arguments":{...}}]}`,
under a grammar (llguidance's Lark dialect) that allows exactly what `tool_choice` permits:
- `auto`: that object, or an answer (plain text not starting with "{", or JSON of the
  request's `response_format`);
- `required`: that object; a named function: that object with only that function;
- one call, unless the request sets `parallel_tool_calls: true` (then up to
  `MAX_PARALLEL_CALLS`, and the model may stop after any); a named function, always one.
  OpenAI defaults to parallel calls; small models repeat a call until `max_tokens` (the last
  one cut off), so here, as in llama.cpp's server, a request asks for them.
Each call's arguments follow its function's `parameters` schema, read as OpenAI's strict mode
reads it (`strict_arguments`). The tools are described in
a system message (and given to templates that read `tools` too), and earlier calls are
written back into the prompt in the same form, so a round trip reads as the model wrote it.

`ToolCallParser` turns one choice's streamed text into OpenAI's deltas: content, or per call
an `index`, an `id`, `type` and `function.name` first, then `function.arguments` pieces.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from inference.chat.grammar import JSON_OPTIONS
from inference.chat.schema_check import check_schema
from server.core.errors import bad_request

MARKER = '{"tool_calls":['
MAX_PARALLEL_CALLS = 8


def _lark_string(text: str) -> str:
    return orjson.dumps(text).decode()  # a JSON string is a valid Lark literal


def _json(value: Any) -> str:
    # the standard library's encoder: orjson refuses integers beyond 64 bits, valid in JSON
    return json.dumps(value, separators=(",", ":"))


def _schema(schema: dict[str, Any]) -> str:
    return _json({**schema, "x-guidance": JSON_OPTIONS})


# Keywords whose value is one subschema, a list of them, or a map of names to them
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("prefixItems", "anyOf", "oneOf", "allOf", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_arguments(schema: Any) -> Any:
    """`schema` as OpenAI's strict mode reads it: every object schema that leaves
    `additionalProperties` unset gets it false, so arguments hold the schema's properties and
    nothing else (given an open object, a small model fills extra keys with the schema's own
    words: `{"city": "Paris", "type": "string"}`). A schema that sets it keeps its value."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = strict_arguments(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [strict_arguments(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_arguments(s) for name, s in out[key].items()}
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) \
        or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_grammar(functions: list[dict[str, Any]], choice: str, *, parallel: bool,
                 answer_schema: dict[str, Any] | None = None) -> str:
    """A Lark grammar for the model's reply. `functions` are OpenAI function definitions
    (name, parameters), already narrowed to what `choice` ("auto" or "required") allows."""
    rules = []
    for i, fn in enumerate(functions):
        opening = _lark_string(f'{{"name":"{fn["name"]}","arguments":')
        # arguments: an object, with the schema's properties only
        params = strict_arguments({**(fn.get("parameters") or {}), "type": "object"})
        check_schema(params, param="tools")
        rules.append(f'fn_{i}: {opening} %json {_schema(params)} "}}"')
    repeat = f' ("," call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    lines = [
        "start: calls | answer" if choice == "auto" else "start: calls",
        f'calls: {_lark_string(MARKER)} call{repeat} "]}}"',
        "call: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
        *rules,
    ]
    if choice == "auto":
        if answer_schema is not None:
            check_schema(answer_schema, param="response_format")
            lines.append(f"answer: %json {_schema(answer_schema)}")
        else:
            lines += ["answer: TEXT", r"TEXT: /[^{](.|\n)*/"]
    return "\n".join(lines) + "\n"


def tool_preamble(functions: list[dict[str, Any]], choice: str) -> str:
    """The system message that describes the tools and how to call them."""
    lines = ["You can call these functions:"]
    for fn in functions:
        line = f"- {fn['name']}"
        if fn.get("description"):
            line += f": {fn['description']}"
        params = fn.get("parameters")
        if params:
            line += f" Arguments (JSON schema): {_json(params)}"
        lines.append(line)
    form = '{"tool_calls":[{"name":"<function name>","arguments":{<arguments>}}]}'
    if choice == "auto":
        lines.append(f"To call functions, reply with only this JSON: {form}. Otherwise "
                     "answer the user directly.")
    else:
        lines.append(f"Call a function now: reply with only this JSON: {form}.")
    lines.append("A function's result comes back in a later message.")
    return "\n".join(lines)


MAX_SCHEMA_NOTE = 4096  # bytes of schema quoted to the model; the grammar enforces any size


def json_preamble(schema: dict[str, Any]) -> str:
    """The system message for a `response_format`: the grammar makes the answer JSON, and
    this tells the model which (a small model that is not told fills an unbounded integer
    with digits until max_tokens). A schema too large to quote is left to the grammar."""
    text = _json(schema)
    if schema == {"type": "object"} or len(text) > MAX_SCHEMA_NOTE:
        return "Reply with only JSON."
    return f"Reply with only JSON that follows this JSON schema: {text}"


def calls_text(calls: list[dict[str, Any]]) -> str:
    """An assistant message's `tool_calls`, written as the model writes them."""
    written = []
    for call in calls:
        fn = call.get("function") or {}
        raw = fn.get("arguments") or "{}"
        try:
            args = orjson.loads(raw) if isinstance(raw, str) else raw
        except orjson.JSONDecodeError:
            args = raw  # kept as the client sent it
        written.append({"name": fn.get("name", ""), "arguments": args})
    return orjson.dumps({"tool_calls": written}).decode()


def prompt_messages(messages: list[dict[str, Any]], *, native: bool,
                    preamble: str | None) -> list[dict[str, Any]]:
    """Messages for the chat template: `preamble` joins the system message (or becomes
    one); assistant calls and tool results are written as text unless the template reads
    them itself (`native`)."""
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    out: list[dict[str, Any]] = []
    for msg in messages:
        calls = msg.get("tool_calls")
        if msg["role"] == "assistant" and calls:
            for call in calls:
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
            if not native:
                text = calls_text(calls)
                msg = {"role": "assistant",
                       "content": f"{msg['content']}\n{text}" if msg["content"] else text}
        elif msg["role"] == "tool" and not native:
            name = names.get(str(msg.get("tool_call_id")), "a function")
            msg = {"role": "user", "content": f"Result of {name}: {msg['content']}"}
        out.append(msg)
    if preamble:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def narrow(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]
           ) -> tuple[list[dict[str, Any]], str]:
    """The function definitions `tool_choice` allows, and the mode: "auto" or "required"
    (a named function is "required" over that one function)."""
    functions = [t["function"] for t in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the "
                              "tools", param="tool_choice")
        return chosen, "required"
    return functions, tool_choice


class ToolCallParser:
    """One choice's streamed text, as OpenAI deltas: `feed` returns (content, tool-call
    deltas). `mode` "auto" holds text while it could still be the start of a call."""

    def __init__(self, mode: str) -> None:
        self._mode = "undecided" if mode == "auto" else "calls"
        self._buf = ""  # text not yet turned into deltas
        self._state = "marker"  # in calls mode: marker, open, name, args, close, done
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls = 0  # calls started

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self._mode == "text":
            return text, []
        self._buf += text
        if self._mode == "undecided":
            if MARKER.startswith(self._buf):
                return "", []
            if not self._buf.startswith(MARKER):
                self._mode = "text"
                content, self._buf = self._buf, ""
                return content, []
            self._mode = "calls"
        return "", self._parse()

    def finish(self) -> str:
        """Text held back when the choice ended (an answer that began like a call)."""
        if self._mode == "undecided":
            content, self._buf = self._buf, ""
            return content
        return ""

    def _expect(self, literal: str, then: str) -> bool:
        if len(self._buf) < len(literal):
            return False
        self._buf = self._buf[len(literal):]  # the grammar wrote exactly this
        self._state = then
        return True

    def _parse(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._buf:
            if self._state == "marker":
                if not self._expect(MARKER, "open"):
                    break
            elif self._state == "open":
                if not self._expect('{"name":"', "name"):
                    break
            elif self._state == "name":
                end = self._buf.find('"')
                if end < 0:
                    break
                name, self._buf = self._buf[:end], self._buf[end + 1:]
                out.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                            "type": "function", "function": {"name": name, "arguments": ""}})
                self.calls += 1
                self._state = "args_key"
            elif self._state == "args_key":
                if not self._expect(',"arguments":', "args"):
                    break
            elif self._state == "args":
                piece = self._scan()
                if piece:
                    out.append({"index": self.calls - 1, "function": {"arguments": piece}})
            elif self._state == "close":
                if not self._expect("}", "next"):
                    break
            elif self._state == "next":
                if self._buf.startswith(","):
                    self._buf = self._buf[1:]
                    self._state = "open"
                elif self._expect("]}", "done"):
                    continue
                else:
                    break
            else:  # done: nothing may follow
                self._buf = ""
        return out

    def _scan(self) -> str:
        """Consume the arguments' JSON up to its end (or the buffer's)."""
        for i, ch in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    piece, self._buf = self._buf[:i + 1], self._buf[i + 1:]
                    self._state = "close"
                    return piece
        piece, self._buf = self._buf, ""
        return piece
