"""Anthropic's Messages request, parsed at the edge, and its content blocks turned into the
chat-completions request the generation loop reads.

What these models cannot do is refused with a 400 that names it: images and documents,
extended thinking, server tools (web search, code execution, bash, the text editor, computer
use), MCP servers and containers. Unknown fields are ignored, as elsewhere.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import Field, field_validator

from server.core.errors import bad_request
from server.openai.wire import FUNCTION_NAME, _check_depth, _WireModel

MEDIA_BLOCKS = ("image", "document", "search_result", "container_upload")
MAX_STOPS = 4  # what the generation loop matches at once (OpenAI's limit too)


class TextBlock(_WireModel):
    type: Literal["text"]
    text: str


class Tool(_WireModel):
    name: str = Field(pattern=FUNCTION_NAME)
    type: str | None = None  # None or "custom": a client tool; anything else: a server tool
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    _depth = field_validator("input_schema")(_check_depth)


class ToolChoice(_WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_WireModel):
    type: str
    budget_tokens: int | None = None


class Message(_WireModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_WireModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOPS)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    stream: bool = False
    thinking: Thinking | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    container: str | dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.thinking is not None and self.thinking.type != "disabled":
            raise bad_request("extended thinking is not supported: the served models do not "
                              "reason before answering", param="thinking")
        if self.mcp_servers:
            raise bad_request("MCP servers are not supported", param="mcp_servers")
        if self.container is not None:
            raise bad_request("containers (code execution) are not supported",
                              param="container")
        for i, tool in enumerate(self.tools or ()):
            if tool.type not in (None, "custom"):
                raise bad_request(f"server tools such as {tool.type!r} are not supported; "
                                  "this server serves client tools (name, description, "
                                  "input_schema) only", param=f"tools.{i}.type")
            schema = tool.input_schema or {}
            if schema.get("type", "object") != "object":
                raise bad_request("input_schema must be a JSON schema of type 'object'",
                                  param=f"tools.{i}.input_schema")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise bad_request(f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        if choice is not None and choice.type == "tool" and not choice.name:
            raise bad_request("tool_choice of type 'tool' needs a name", param="tool_choice.name")

    def chat_body(self, *, stream: bool = True) -> dict[str, Any]:
        """The chat-completions request that answers this one."""
        body: dict[str, Any] = {"model": self.model, "messages": self.chat_messages(),
                                "stream": stream, "max_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        user = (self.metadata or {}).get("user_id")
        if isinstance(user, str):
            body["user"] = user
        choice = self.tool_choice
        if self.tools and (choice is None or choice.type != "none"):
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description,
                "parameters": t.input_schema or {"type": "object"}}} for t in self.tools]
            if choice is not None:
                body["tool_choice"] = {"auto": "auto", "any": "required"}.get(choice.type) or \
                    {"type": "function", "function": {"name": choice.name}}
                # Anthropic allows several calls unless told not to; here, as on every
                # surface, one call unless the request asks for more (docs/api.md)
                if choice.disable_parallel_tool_use is False:
                    body["parallel_tool_calls"] = True
        return body

    def chat_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else \
                "\n".join(block.text for block in self.system)
            out.append({"role": "system", "content": system})
        for i, message in enumerate(self.messages):
            out += _blocks(message, i)
        return out


def _blocks(message: Message, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: a user's tool results become tool messages
    (before its text); an assistant's tool uses become its tool_calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[str] = []
    results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        kind = block.get("type") if isinstance(block, dict) else None
        where = f"messages.{i}.content.{j}"
        if kind in MEDIA_BLOCKS:
            raise bad_request(f"{kind} blocks are not supported: the served models read text "
                              "only", param=where)
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue  # another model's reasoning: these models do not read it
        elif kind == "tool_use" and message.role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input"), dict):
                raise bad_request("a tool_use block needs id, name and input (an object)",
                                  param=where)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": orjson.dumps(block["input"]).decode()}})
        elif kind == "tool_result" and message.role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request("a tool_result block needs tool_use_id", param=where)
            text = _result_text(block.get("content", ""), where)
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": text})
        else:
            raise bad_request(f"content blocks of type {kind!r} are not supported in "
                              f"{message.role} messages", param=where)
    out = list(results)
    if calls:
        out.append({"role": "assistant", "content": "\n".join(texts) or None,
                    "tool_calls": calls})
    elif texts or not results:
        out.append({"role": message.role, "content": "\n".join(texts)})
    return out


def _result_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "text" \
                    or not isinstance(block.get("text"), str):
                kind = block.get("type") if isinstance(block, dict) else None
                raise bad_request(f"tool_result content of type {kind!r} is not supported; "
                                  "send text", param=where)
            texts.append(block["text"])
        return "\n".join(texts)
    raise bad_request("a tool_result's content must be a string or text blocks", param=where)


class CountTokensRequest(MessagesRequest):
    max_tokens: int = Field(default=1, ge=1)  # count_tokens takes no max_tokens
