"""Legacy completions service (`/v1/completions`): plain prompts on the chat engines, no chat
template. LiteLLM's `text_completion`, older clients and code-completion plugins use it.

It shares the engine, the one generation loop and the chunk framing with chat; it knows the
shape of `text_completion` objects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from inference.chat.engine import ChatEngine
from server.core.metrics import MeteredStream, Metrics
from server.core.registry import ModelRegistry
from server.core.streaming import Event, events
from server.core.tenant import Tenant
from server.openai.chat import sampling_params
from server.openai.chunks import CompletionChunks, collect
from server.openai.wire import CompletionRequest, parse_model
from server.tenants.limits import Gate

DEFAULT_MAX_TOKENS = 16


class CompletionService:
    """Serves `/v1/completions` from the registry's chat engines."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, gate: Gate | None = None,
                 *, max_tokens_limit: int) -> None:
        self._registry = registry
        self._metrics = metrics
        self._gate = gate or Gate()
        self._max_tokens_limit = max_tokens_limit

    def parse(self, body: dict[str, Any]) -> CompletionRequest:
        """Validate a decoded request body. Prompts are counted, and token-id prompts
        measured, first: validation costs event-loop time per item (0.16 s for 2 MiB of
        one-id prompts), and no model runs more prompts than its decode slots."""
        raw, model = body.get("prompt"), body.get("model")
        engine = self._registry.loaded_chat(model) if isinstance(model, str) else None
        if isinstance(raw, list) and raw and engine is not None:
            prompts = [raw] if isinstance(raw[0], int) else raw
            engine.check_prompt_shape(len(prompts), [len(p) for p in prompts
                                                     if isinstance(p, list)])
        return parse_model(CompletionRequest, body)

    async def start(self, req: CompletionRequest, tenant: Tenant
                    ) -> tuple[MeteredStream, list[str]]:
        """Queue a parsed request of `tenant` (within its limits; prompt cache of its scope
        only); returns its stream and, with `echo`, each choice's prompt text. Every error is
        raised here, before any response."""
        req.check_supported()
        if req.max_tokens is None:  # OpenAI's default for this endpoint, within the cap
            req = req.model_copy(update={"max_tokens": min(DEFAULT_MAX_TOKENS,
                                                           self._max_tokens_limit)})
        prompts = req.prompts()
        async with self._gate.admitted(tenant) as lease, \
                self._registry.use(req.model, "chat", req.keep_alive_seconds(),
                                   tenant=tenant) as engine:
            assert isinstance(engine, ChatEngine)
            params = sampling_params(req, engine.sampling_defaults, self._max_tokens_limit)
            stream = await engine.start_completion(prompts, params, n=req.n,
                                                   cache_scope=tenant.scope,
                                                   weight=tenant.weight)
            echo = [p if isinstance(p, str) else engine.detokenize(p)
                    for p in prompts for _ in range(req.n)] if req.echo else []
        return MeteredStream(stream, self._metrics, req.model, "completions", tenant.name,
                             lease.finish), echo

    def events(self, req: CompletionRequest, stream: MeteredStream, echo: list[str], *,
               include_usage: bool, idle_s: float | None = None
               ) -> AsyncGenerator[Event, None]:
        """The generation as `text_completion` chunks (see `server.core.streaming.events`)."""
        shape = CompletionChunks(model=req.model, include_usage=include_usage, echo=echo)
        return events(stream, shape, idle_s=idle_s)

    async def complete(self, req: CompletionRequest, stream: MeteredStream, echo: list[str]
                       ) -> dict[str, Any]:
        """Run a non-streamed request to the end and build its `text_completion`."""
        whole = await collect(self.events(req, stream, echo, include_usage=False), "text")
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": req.model, "system_fingerprint": None,
            "choices": [{"index": i, "text": text, "logprobs": None,
                         "finish_reason": whole.finish[i]} for i, text in whole.texts.items()],
            "usage": whole.usage,
        }
