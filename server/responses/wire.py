"""OpenAI's Responses request (`POST /v1/responses`), parsed at the edge, and its input items
turned into the chat messages the generation loop reads.

Fields these models cannot honour are refused with a 400 naming the field, never ignored:
built-in tools, images, files and audio in the input, reasoning effort, background runs,
stored prompts and conversations. Unknown fields are ignored, as elsewhere
(`server.openai.wire`).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, field_validator

from server.core.errors import bad_request
from server.openai.wire import (
    FUNCTION_NAME,
    _check_depth,
    _KeepAlive,
    _WireModel,
)

BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview",
                  "computer_use", "code_interpreter", "image_generation", "mcp", "local_shell",
                  "shell", "apply_patch", "custom")
MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class TextFormat(_WireModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    _depth = field_validator("json_schema")(_check_depth)

    def as_dict(self) -> dict[str, Any]:
        """The format as the response object echoes it."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            out.update(name=self.name, schema=self.json_schema or {"type": "object"},
                       description=self.description, strict=self.strict)
        return out


class TextConfig(_WireModel):
    format: TextFormat = TextFormat()
    verbosity: str | None = None


class FunctionTool(_WireModel):
    type: str
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _depth = field_validator("parameters")(_check_depth)


class NamedFunction(_WireModel):
    type: Literal["function"]
    name: str


class Reasoning(_WireModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_WireModel, _KeepAlive):
    model: str
    input: str | list[dict[str, Any]] = Field(default="")
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None  # None: one call (see docs/api.md)
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # refused when set to anything these models cannot do
    reasoning: Reasoning | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)

    def check_supported(self) -> None:
        if self.background:
            raise bad_request("background responses are not supported; stream the response "
                              "or wait for it", param="background")
        # a summary of no reasoning is empty: only an effort asks for what cannot be done
        if self.reasoning is not None and self.reasoning.effort not in (None, "none"):
            raise bad_request(f"reasoning effort {self.reasoning.effort!r} is not supported: "
                              "the served models do not reason before answering (only "
                              "'none' is accepted)", param="reasoning.effort")
        if self.conversation is not None:
            raise bad_request("conversations are not served; continue a response with "
                              "previous_response_id", param="conversation")
        if self.prompt is not None:
            raise bad_request("stored prompt templates are not served; send instructions "
                              "and input", param="prompt")
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function":
                kind = ("built-in tools such as " if tool.type in BUILT_IN_TOOLS
                        else "tools of type ")
                raise bad_request(f"{kind}{tool.type!r} are not supported; this server "
                                  "serves function tools only", param=f"tools[{i}].type")
            if tool.name is None:
                raise bad_request("a function tool needs a name", param=f"tools[{i}].name")
            params = tool.parameters
            if params is not None and params.get("type", "object") != "object":
                raise bad_request("parameters must be a JSON schema of type 'object'",
                                  param=f"tools[{i}].parameters")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise bad_request("tool_choice needs tools", param="tool_choice")
        fmt = self.text_format()
        if fmt.type == "json_schema" and fmt.name is None:
            raise bad_request("text.format of type 'json_schema' needs a name",
                              param="text.format.name")

    def text_format(self) -> TextFormat:
        return self.text.format if self.text is not None else TextFormat()

    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    def chat_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The chat-completions request that generates this response."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        for name in ("temperature", "top_p", "user", "parallel_tool_calls", "keep_alive"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.logprobs():
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        fmt = self.text_format()
        if fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.json_schema or {"type": "object"},
                "strict": fmt.strict}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description,
                "parameters": t.parameters, "strict": t.strict}} for t in self.tools]
            if self.tool_choice is not None:
                choice = self.tool_choice
                body["tool_choice"] = choice if isinstance(choice, str) else \
                    {"type": "function", "function": {"name": choice.name}}
        return body

    def echo(self) -> dict[str, Any]:
        """The request's settings as the response object repeats them."""
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "parallel_tool_calls": bool(self.parallel_tool_calls),
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": self.text_format().as_dict()},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": t.strict}
                      for t in self.tools or ()],
            "top_p": self.top_p,
            "top_logprobs": self.top_logprobs,
            "truncation": self.truncation or "disabled",
            "user": self.user,
            "metadata": self.metadata or {},
            "background": False,
            "max_tool_calls": self.max_tool_calls,
            "service_tier": "default",
        }


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as items in OpenAI's stored shape (each with an id), checked."""
    if isinstance(raw, str):
        return [_message("user", [{"type": "input_text", "text": raw}])]
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad_request("each input item must be an object", param=f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message_item(item, i))
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise bad_request(f"a function_call item needs {name} (a string)",
                                      param=f"input[{i}].{name}")
            items.append({"type": "function_call", "id": item.get("id") or new_id("fc"),
                          "call_id": item["call_id"], "name": item["name"],
                          "arguments": item["arguments"], "status": "completed"})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request("a function_call_output item needs call_id",
                                  param=f"input[{i}].call_id")
            items.append({"type": "function_call_output", "id": item.get("id") or new_id("fco"),
                          "call_id": item["call_id"],
                          "output": _output_text(item.get("output"), i),
                          "status": "completed"})
        elif kind == "reasoning":
            continue  # another model's reasoning: these models do not read it
        else:
            raise bad_request(f"input items of type {kind!r} are not supported; send message, "
                              "function_call and function_call_output items",
                              param=f"input[{i}].type")
    return items


def _message(role: str, content: list[dict[str, Any]], status: str = "completed"
             ) -> dict[str, Any]:
    return {"type": "message", "id": new_id("msg"), "role": role, "content": content,
            "status": status}


def _message_item(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad_request("a message's role must be user, system, developer or assistant",
                          param=f"input[{i}].role")
    content = item.get("content")
    text_part = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": text_part, "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS:
                raise bad_request(f"{kind} parts are not supported: the served models read "
                                  "text only", param=f"input[{i}].content[{j}]")
            if kind not in ("input_text", "output_text", "text", "refusal") \
                    or not isinstance(part.get("text", part.get("refusal")), str):
                raise bad_request(f"content parts of type {kind!r} are not supported; send "
                                  "input_text or output_text parts",
                                  param=f"input[{i}].content[{j}]")
            written: dict[str, Any] = {"type": text_part,
                                       "text": part.get("text", part.get("refusal"))}
            if text_part == "output_text":
                written["annotations"] = []
            parts.append(written)
    else:
        raise bad_request("a message needs content: a string or a list of parts",
                          param=f"input[{i}].content")
    message = _message(role, parts)
    if isinstance(item.get("id"), str):
        message["id"] = item["id"]
    return message


def _output_text(output: Any, i: int) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for part in output:
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise bad_request("a function_call_output's output must be a string or text "
                                  "parts", param=f"input[{i}].output")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request("a function_call_output needs output (a string)",
                      param=f"input[{i}].output")


def chat_messages(instructions: str | None, items: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Items (stored or new, in order) as chat-completions messages: an assistant's text and
    the calls that follow it become one assistant message; each call's output a tool
    message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "\n".join(p["text"] for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    return messages


__all__ = ["ResponsesRequest", "chat_messages", "input_items", "new_id"]
