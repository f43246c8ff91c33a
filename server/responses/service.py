"""The Responses API's service: a request becomes a chat-completions request on the one
generation loop (`server.openai.chat.ChatService`), its chunks become Responses events
(`events.py`), and the finished response goes to the store (`store.py`) with the items it
read, so `previous_response_id` continues it after a restart or on another replica.

A continued conversation renders as the same messages the chat-completions request with the
whole history would, so the prompt cache skips what its KV still holds: only the new turn's
tokens are read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from server.core.database import DatabaseUnavailable
from server.core.errors import bad_request, not_found, unavailable
from server.core.streaming import Event
from server.core.tenant import Tenant
from server.openai.chat import ChatService
from server.openai.wire import ChatCompletionRequest, parse_model
from server.responses.events import ResponseWriter
from server.responses.store import ResponseStore, StoredResponse
from server.responses.wire import ResponsesRequest, chat_messages, input_items

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
log = logging.getLogger(__name__)


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self._chat = chat
        self.store = store

    def parse(self, body: dict[str, Any]) -> ResponsesRequest:
        req = parse_model(ResponsesRequest, body)
        req.check_supported()
        return req

    async def _context(self, req: ResponsesRequest, owner: str
                       ) -> tuple[list[dict[str, Any]], ChatCompletionRequest]:
        """The items the model reads (earlier turns', then this request's) and the chat
        request that generates the answer."""
        earlier: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            found = await self.get(req.previous_response_id, owner, param="previous_response_id")
            earlier = found.context + [item for item in found.response["output"]
                                       if item["type"] in ("message", "function_call")]
        new = input_items(req.input)
        if not new and not earlier:
            raise bad_request("input is required", param="input")
        items = earlier + new
        body = req.chat_body(chat_messages(req.instructions, items))
        return items, self._chat.parse(body)

    async def create(self, req: ResponsesRequest, tenant: Tenant, *, idle_s: float | None
                     ) -> tuple[ResponseWriter, AsyncGenerator[Event, None]]:
        """Start the response (every error before it starts is raised here) and return its
        events; the last is `response.completed`, `.incomplete` or `.failed`. A stored
        response is in the store before that event goes out."""
        owner = tenant.scope  # a stored response is its scope's
        items, chat_req = await self._context(req, owner)
        stream = await self._chat.start(chat_req, "responses", tenant)
        writer = ResponseWriter(echo=req.echo())
        chunks = self._chat.events(chat_req, stream, include_usage=True, idle_s=idle_s)
        return writer, self._stored(req, owner, items, writer, writer.translate(chunks))

    async def _stored(self, req: ResponsesRequest, owner: str, items: list[dict[str, Any]],
                      writer: ResponseWriter, events: AsyncGenerator[dict[str, Any] | None, None]
                      ) -> AsyncGenerator[Event, None]:
        try:
            async for event in events:
                if event is not None and event["type"] in TERMINAL and req.store \
                        and writer.status != "failed":
                    try:
                        await self.store.put(StoredResponse(
                            writer.id, owner, time.time(), writer.response, items,
                            req.instructions))
                    except DatabaseUnavailable:
                        # the answer is whole: it is served, marked as not stored
                        log.exception("response %s was not stored", writer.id)
                        writer.echo["store"] = False
                        event = {**event, "response": writer.response}
                yield event
        finally:
            await events.aclose()

    @staticmethod
    async def complete(writer: ResponseWriter, events: AsyncGenerator[Event, None]
                       ) -> dict[str, Any]:
        """Run a response to its end: the response object, or the error that ended it."""
        async with aclosing(events):
            async for _ in events:
                pass
        if writer.failure is not None:
            raise writer.failure
        return writer.response

    async def get(self, id: str, owner: str, *, param: str | None = None) -> StoredResponse:
        try:
            found = await self.store.get(id, owner)
        except DatabaseUnavailable as exc:
            raise unavailable(str(exc), code="store_unavailable") from exc
        if found is None:
            raise not_found(f"no response with id '{id}' is stored for this key", param=param,
                            code="response_not_found")
        return found

    async def delete(self, id: str, owner: str) -> dict[str, Any]:
        try:
            deleted = await self.store.delete(id, owner)
        except DatabaseUnavailable as exc:
            raise unavailable(str(exc), code="store_unavailable") from exc
        if not deleted:
            raise not_found(f"no response with id '{id}' is stored for this key",
                            code="response_not_found")
        return {"id": id, "object": "response.deleted", "deleted": True}

    async def input_tokens(self, req: ResponsesRequest, tenant: Tenant) -> dict[str, Any]:
        _, chat_req = await self._context(req, tenant.scope)
        return {"object": "response.input_tokens",
                "input_tokens": await self._chat.count_prompt(chat_req, tenant)}


def page(items: list[dict[str, Any]], *, limit: int, order: str, after: str | None
         ) -> dict[str, Any]:
    """OpenAI's cursor pagination over a response's input items."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise bad_request(f"no input item with id '{after}' in this response", param="after")
        ordered = ordered[ids.index(after) + 1:]
    data = ordered[:limit]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}
