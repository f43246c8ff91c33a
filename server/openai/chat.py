"""Chat completions service: turns a parsed request into engine calls and OpenAI objects.

It knows the shape of `chat.completion` objects (chunks: `chunks.py`); it does not know
about HTTP or SSE framing (see `routes.py` and `server/core/sse.py`). The Responses API
(`server.responses`) generates through it too.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import anyio

from inference.chat.engine import ChatEngine, Constraint, GenerationStream
from inference.chat.grammar import json_schema_grammar
from inference.chat.sampling import MIN_TEMPERATURE, SamplingParams
from inference.chat.spec import SamplingDefaults
from server.core.errors import bad_request, too_large
from server.core.metrics import MeteredStream, Metrics
from server.core.registry import ModelRegistry
from server.core.streaming import Event, events
from server.core.tenant import Tenant
from server.openai import tools
from server.openai.chunks import ChatChunks, collect
from server.openai.wire import ChatCompletionRequest, GenerationRequest, parse_model
from server.tenants.limits import Gate


def sampling_params(req: GenerationRequest, defaults: SamplingDefaults, max_tokens_limit: int
                    ) -> SamplingParams:
    """A request's sampling; fields it leaves unset take the model folder's defaults."""
    limit = req.completion_limit()
    if limit is not None and limit > max_tokens_limit:
        raise bad_request(f"max_tokens {limit} exceeds this server's limit of "
                          f"{max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
    temperature = defaults.temperature if req.temperature is None else req.temperature
    if req.n > 1 and req.temperature is None and temperature < MIN_TEMPERATURE:
        # n greedy choices would be n copies of one answer: a request for alternatives that
        # leaves the temperature unset gets OpenAI's default, 1, over a greedy folder default
        temperature = 1.0
    return SamplingParams(
        temperature=temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else req.top_k, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        max_tokens=limit, stop=req.stop_list(), logit_bias=req.logit_bias_pairs())


@dataclasses.dataclass(frozen=True)
class _Plan:
    messages: list[dict[str, Any]]
    grammar: Constraint | None
    tools: list[dict[str, Any]] | None


class ChatService:
    """Serves `/v1/chat/completions` from the registry's engines."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, gate: Gate | None = None,
                 *, max_messages: int, max_tokens_limit: int) -> None:
        self._registry = registry
        self._metrics = metrics
        self._gate = gate or Gate()  # tenants' limits (none without one)
        self._max_messages = max_messages
        self._max_tokens_limit = max_tokens_limit

    def parse(self, body: dict[str, Any]) -> ChatCompletionRequest:
        """Validate a decoded request body. Messages and content parts are counted first:
        validation costs event-loop time per item (0.4 s for 4 MiB of tiny messages)."""
        messages = body.get("messages")
        if isinstance(messages, list):
            if len(messages) > self._max_messages:
                raise too_large(f"{len(messages)} messages; this server accepts at most "
                                f"{self._max_messages} per request", param="messages",
                                code="too_many_messages")
            parts = sum(len(m["content"]) for m in messages
                        if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > self._max_messages:
                raise too_large(f"{parts} content parts; this server accepts at most "
                                f"{self._max_messages} per request", param="messages",
                                code="too_many_content_parts")
        return parse_model(ChatCompletionRequest, body)

    async def start(self, req: ChatCompletionRequest, endpoint: str, tenant: Tenant
                    ) -> MeteredStream:
        """Queue a parsed request of `tenant` (within its limits; reusing only its scope's
        prompt-cache entries). Every error is raised here, before any response."""
        req.check_supported()
        async with self._gate.admitted(tenant) as lease, \
                self._registry.use(req.model, "chat", req.keep_alive_seconds(),
                                   tenant=tenant) as engine:
            assert isinstance(engine, ChatEngine)
            stream = await self._start(req, engine, tenant)
        return MeteredStream(stream, self._metrics, req.model, endpoint, tenant.name,
                             lease.finish)

    async def _start(self, req: ChatCompletionRequest, engine: ChatEngine, tenant: Tenant
                     ) -> GenerationStream:
        params = dataclasses.replace(
            sampling_params(req, engine.sampling_defaults, self._max_tokens_limit),
            logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
        plan = self._plan(req, engine)
        return await engine.start(plan.messages, params, n=req.n, grammar=plan.grammar,
                                  tools=plan.tools, cache_scope=tenant.scope,
                                  weight=tenant.weight)

    async def count_prompt(self, req: ChatCompletionRequest, tenant: Tenant) -> int:
        """The tokens of the prompt `req` would be read as: template, tools and the
        preambles that describe them included (what `usage.prompt_tokens` reports)."""
        req.check_supported()
        async with self._registry.use(req.model, "chat", req.keep_alive_seconds(),
                                      tenant=tenant) as engine:
            assert isinstance(engine, ChatEngine)
            plan = self._plan(req, engine, compile_grammar=False)
            ids = await anyio.to_thread.run_sync(engine.model.encode_prompt, plan.messages,
                                                 plan.tools)
        return len(ids)

    def _plan(self, req: ChatCompletionRequest, engine: ChatEngine, *,
              compile_grammar: bool = True) -> _Plan:
        """The prompt's messages, the tools a template reads, and the grammar to follow."""
        messages = [m.prompt_dict() for m in req.messages]
        schema = req.response_format.answer_schema() if req.response_format else None
        mode = req.tool_mode()
        grammar: Constraint | None = None
        offered: list[dict[str, Any]] | None = None
        if mode != "none":
            assert req.tools is not None
            functions, choice = tools.narrow([t.model_dump(exclude_none=True)
                                              for t in req.tools],
                                             mode if isinstance(mode, str)
                                             else mode.model_dump())
            offered = [{"type": "function", "function": f} for f in functions]
            # one call unless the request asks for more; a named function: always one
            parallel = req.parallel_tool_calls is True and isinstance(mode, str)
            if compile_grammar:
                grammar = Constraint(tools.tool_grammar(functions, choice, parallel=parallel,
                                                        answer_schema=schema), "tools")
            preamble: str | None = tools.tool_preamble(functions, choice)
            if schema is not None and choice == "auto":
                preamble = f"{preamble}\n{tools.json_preamble(schema)}"
        else:
            preamble = None if schema is None else tools.json_preamble(schema)
            if schema is not None and compile_grammar:
                grammar = Constraint(json_schema_grammar(schema), "response_format")
        messages = tools.prompt_messages(messages, native=engine.supports_tools,
                                         preamble=preamble)
        return _Plan(messages, grammar, offered)

    def events(self, req: ChatCompletionRequest, stream: MeteredStream, *,
               include_usage: bool, idle_s: float | None = None, stop_sequences: bool = False
               ) -> AsyncGenerator[Event, None]:
        """The generation as `chat.completion.chunk`s (see `server.core.streaming.events`);
        `stop_sequences`: finish chunks name the stop string that ended them."""
        mode = req.tool_mode()
        return events(stream, ChatChunks(
            model=req.model, include_usage=include_usage, logprobs=req.logprobs,
            tools=None if mode == "none" else "auto" if mode == "auto" else "calls",
            stop_sequences=stop_sequences), idle_s=idle_s)

    async def complete(self, req: ChatCompletionRequest, stream: MeteredStream
                       ) -> dict[str, Any]:
        """Run a non-streamed request to the end and build its `chat.completion` from the
        same chunks a stream gets."""
        whole = await collect(self.events(req, stream, include_usage=False), "delta")
        choices = []
        for i, text in whole.texts.items():
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            calls = whole.tool_calls.get(i)
            if calls:
                message["content"] = text or None
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": whole.logprobs.get(i, []), "refusal": None}
                            if req.logprobs else None,
                            "finish_reason": whole.finish[i]})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": req.model, "system_fingerprint": None,
            "choices": choices, "usage": whole.usage,
        }
