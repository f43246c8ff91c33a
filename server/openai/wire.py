"""OpenAI wire schemas (chat completions, legacy completions, embeddings), parsed once at the
edge with pydantic.

Unknown fields are accepted and ignored, as OpenAI clients and agent frameworks expect.
An explicit `null` on an optional field means "unset", as OpenAI reads it: clients that
serialise every field send them. Validation errors become one OpenAI-style 400 naming the
offending parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from server.core.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


_DURATION = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama's `keep_alive`: seconds, or a duration such as "30s", "5m", "1h"; negative
    keeps the model loaded, 0 unloads it once the request is done. None: the server's."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = value.strip()
    for unit in sorted(_DURATION, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, unit = text, "s"
    try:
        return float(number) * _DURATION[unit]
    except ValueError:
        raise ValueError(f"keep_alive {value!r} is neither seconds nor a duration such as "
                         "'5m'") from None


class _KeepAlive(BaseModel):
    # An extension (Ollama's): how long the model stays loaded after this request.
    keep_alive: float | str | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, v: float | str | None) -> float | str | None:
        parse_keep_alive(v)
        return v

    def keep_alive_seconds(self) -> float | None:
        return parse_keep_alive(self.keep_alive)


class _WireModel(BaseModel):
    # strict: JSON types must be right ("yes" is no boolean, "1" no number), as OpenAI checks
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if v is not None or k not in fields or fields[k].is_required()}
        return data


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
# JSON schemas nested deeper than this are refused: OpenAI allows 10 levels; serialisers and
# schema compilers recurse, and Python's stack is finite.
MAX_SCHEMA_DEPTH = 64


def _check_depth(value: Any) -> Any:
    """Refuse JSON nested deeper than MAX_SCHEMA_DEPTH (iteratively: no recursion)."""
    level: list[Any] = [value]
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        level = [v for item in level
                 for v in (item.values() if isinstance(item, dict)
                           else item if isinstance(item, list) else ())
                 if isinstance(v, dict | list)]
        if not level:
            return value
    raise ValueError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")


class FunctionCall(_WireModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message of role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def prompt_dict(self) -> dict[str, Any]:
        """The message as chat templates read it."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        """The message's text; list content must consist of text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"content parts of type {part.get('type')!r} are not supported; "
                    "this server accepts text parts only", param="messages")
            parts.append(part["text"])
        return "\n".join(parts)


class StreamOptions(_WireModel):
    include_usage: bool = False


class JsonSchemaFormat(_WireModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # pydantic's `schema` clashes with BaseModel's method, hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    _depth = field_validator("json_schema")(_check_depth)


class ResponseFormat(_WireModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The schema the answer must follow; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return self.json_schema.json_schema or {"type": "object"}
        return None


class FunctionDefinition(_WireModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _depth = field_validator("parameters")(_check_depth)

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON schema of type 'object'")
        return v


class Tool(_WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_WireModel):
    name: str


class NamedToolChoice(_WireModel):
    type: Literal["function"]
    function: NamedFunction


class GenerationRequest(_WireModel, _KeepAlive):
    """The fields chat and legacy completions share: sampling, stopping, streaming."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # Unset sampling fields take the model folder's defaults (see ChatModelSpec.sampling).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for key, bias in v.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids; {key[:20]!r} is not")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {key} is outside -100 to 100")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), b) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # None: one call (see server/openai/tools.py: OpenAI's default is parallel calls)
    parallel_tool_calls: bool | None = None
    # The deprecated forms of tools: read only to refuse them, so an agent that offers
    # functions never gets plain text back as if the server had considered them.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Fields that would change the answer and that these models cannot honour: refused.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_supported(self) -> None:
        """Reject options this server cannot honour rather than silently ignoring them."""
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.functions is not None or self.function_call is not None:
            raise bad_request("functions and function_call are deprecated and not served; "
                              "send tools and tool_choice instead",
                              param="functions" if self.functions is not None
                              else "function_call")
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            raise bad_request("audio output is not supported; these models write text only",
                              param="audio" if self.audio is not None else "modalities")
        for name in ("web_search_options", "reasoning_effort", "verbosity"):
            if getattr(self, name) is not None:
                raise bad_request(f"{name} is not supported by the served models",
                                  param=name)
        if self.tool_choice is not None and not self.tools:
            raise bad_request("tool_choice needs tools", param="tool_choice")

    def tool_mode(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """What the model may do with the tools: OpenAI's default is "auto" when tools are
        given."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"


def parse_model(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` as `model`, turning the first validation error into a 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    # pydantic puts union-member names ("str", "list[...]") into locations; drop them
    loc: list[str] = []
    for p in first.get("loc", ()):
        if p in INPUT_TAGS:  # the embedding input's kinds: the parameter is `input`
            break
        if not str(p).startswith(("function-", "str", "list[")):
            loc.append(str(p))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "is required"
    return bad_request(f"{param}: {msg}" if param else msg, param=param)


def _input_kind(value: Any) -> str:
    # Picks the one union member to try from the first item. Left to itself, pydantic tries
    # every member and records an error per item for each failure: 4 MiB of token ids took
    # up to 1.9 s of event-loop time to validate.
    if isinstance(value, list) and value:
        first = value[0]
        return "ids" if isinstance(first, int) else "id_lists" if isinstance(first, list) \
            else "texts"
    return "texts" if isinstance(value, list) else "text"


INPUT_TAGS = ("text", "texts", "ids", "id_lists")  # also the legacy prompt's kinds
TextsOrTokenIds = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("ids")] | Annotated[list[list[int]], Tag("id_lists")],
    Discriminator(_input_kind)]


class EmbeddingRequest(_WireModel, _KeepAlive):
    model: str
    input: TextsOrTokenIds
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list of texts or a list of token-id lists, none empty. (Their count
        is checked before validation, by EmbeddingService.parse.)"""
        items = _as_list(self.input)
        if not items:
            raise bad_request("input must not be empty", param="input")
        for i, item in enumerate(items):
            if not item or (isinstance(item, str) and not item.strip()):
                raise bad_request(f"input {i} is empty", param="input")
        return items


def _as_list(raw: str | list[str] | list[int] | list[list[int]]
             ) -> list[str] | list[list[int]]:
    """One text, texts, one token-id list, or token-id lists, as a list of texts or lists."""
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(x, int) for x in raw):
        return [cast(list[int], raw)]  # a single token-id list
    return cast(list[str] | list[list[int]], raw)


class CompletionRequest(GenerationRequest):
    """Legacy `/v1/completions`: plain text in, text out, no chat template."""

    prompt: TextsOrTokenIds
    max_tokens: int | None = Field(default=None, ge=1)  # unset: 16, OpenAI's default here
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list of texts or of token-id lists, none empty."""
        items = _as_list(self.prompt)
        if not items or any(not item for item in items):
            raise bad_request("prompt must not be empty", param="prompt")
        return items

    def check_supported(self) -> None:
        """What needs what these models cannot give is refused, never ignored."""
        if self.suffix:
            raise bad_request(
                "suffix (fill-in-the-middle) is not supported: the served models' templates "
                "have no fill-in-the-middle tokens", param="suffix")
        if self.logprobs:
            raise bad_request(
                "logprobs are not supported on /v1/completions yet; with echo they would also "
                "need the prompt's logits, which graphs built with a pruned LM head (the "
                "model builder's default) do not compute", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported (it needs scoring every "
                              "choice by log-probability)", param="best_of")
