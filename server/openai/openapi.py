"""The OpenAPI 3.1 document of npugate's HTTP API, built from the same pydantic models that
validate requests, so the document cannot drift from what the server accepts."""

from __future__ import annotations

from typing import Any

from server.messages.wire import CountTokensRequest, MessagesRequest
from server.openai.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from server.responses.wire import ResponsesRequest

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "OpenAI-style error",
                     "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _json(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"type": "object"}}}}


def _post(summary: str, schema: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": ok, **_errors(400, 401, 403, 404, 413, 415, 429, 431, 503)}}}


def _get(summary: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True,
                "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest,
                  MessagesRequest, CountTokensRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
    chat_ok = {"description": "A chat.completion, or with stream=true an SSE stream of "
                              "chat.completion.chunk events ending in data: [DONE]",
               "content": {"application/json": {"schema": {"type": "object"}},
                           "text/event-stream": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "npugate", "version": "0.1.0",
                 "description": "OpenAI-compatible local inference (chat and embeddings), "
                                "with OpenAI's Responses and Anthropic's Messages APIs. "
                                "WebSocket protocol at /v1/ws: see docs/api.md."},
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/chat/completions": _post("Chat completion", "ChatCompletionRequest", chat_ok),
            "/v1/completions": _post(
                "Legacy text completion (no chat template)", "CompletionRequest",
                {"description": "A text_completion, or with stream=true an SSE stream of "
                                "text_completion events ending in data: [DONE]",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}),
            "/v1/responses": _post(
                "Create a response (the Responses API)", "ResponsesRequest",
                {"description": "A response, or with stream=true an SSE stream of typed "
                                "response.* events ending in response.completed, "
                                "response.incomplete or response.failed",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}),
            "/v1/responses/input_tokens": _post(
                "Count a response request's input tokens", "ResponsesRequest",
                _json("{object: response.input_tokens, input_tokens}")),
            "/v1/responses/{response_id}": {
                verb: {"summary": f"{verb.capitalize()} a stored response (the creating "
                                  "key's only)", "parameters": [_RESPONSE_ID],
                       "responses": {"200": _json("The response" if verb == "get"
                                                  else "{id, object: response.deleted, "
                                                  "deleted: true}"),
                                     **_errors(401, 404, 503)}}
                for verb in ("get", "delete")},
            "/v1/responses/{response_id}/input_items": {"get": {
                "summary": "The items a stored response read, paginated",
                "parameters": [_RESPONSE_ID, *(
                    {"name": name, "in": "query", "schema": schema} for name, schema in (
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                        ("order", {"enum": ["asc", "desc"]}),
                        ("after", {"type": "string"})))],
                "responses": {"200": _json("A list of items"), **_errors(400, 401, 404)}}},
            "/v1/messages": _post(
                "Create a message (Anthropic's Messages API; errors in Anthropic's shape)",
                "MessagesRequest",
                {"description": "A message, or with stream=true an SSE stream of Anthropic's "
                                "events ending in message_stop",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}),
            "/v1/messages/count_tokens": _post(
                "Count a message request's input tokens (Anthropic's shape)",
                "CountTokensRequest", _json("{input_tokens}")),
            "/v1/embeddings": _post("Embeddings", "EmbeddingRequest",
                                    _json("A list of embedding objects")),
            "/v1/models": _get("Every model this server can serve, loaded or not",
                               _json("A list of models"), 401),
            "/v1/models/{model_id}": {"get": {
                "summary": "One model",
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json("A model"), **_errors(401, 404)}}},
            **{f"/v1/admin/models/{{model_id}}/{verb}": {"post": {
                "summary": f"{verb.capitalize()} a model (admin key: see docs/deployment.md)",
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json("The model, as /v1/models lists it"),
                              **_errors(400, 401, 403, 404, 503)}}}
               for verb in ("load", "unload")},
            "/v1/admin/keys": {
                "post": {"summary": "Create an API key with its limits; the key is in this "
                                    "answer only (admin key: see docs/tenants.md)",
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"type": "object", "required": ["name"]}}}},
                         "responses": {"201": _json("The key object, with `key`"),
                                       **_errors(400, 401, 403, 409)}},
                "get": {"summary": "Every API key, revoked ones included (never the keys)",
                        "responses": {"200": _json("A list of key objects"),
                                      **_errors(401, 403)}}},
            "/v1/admin/keys/{key_id}": {
                verb: {"summary": summary, "parameters": [
                    {"name": "key_id", "in": "path", "required": True,
                     "description": "the key's id or name", "schema": {"type": "string"}}],
                       "responses": {"200": _json("The key object"),
                                     **_errors(401, 403, 404)}}
                for verb, summary in (("get", "One API key"),
                                      ("delete", "Revoke an API key: its next request fails"))},
            "/v1/admin/usage": {"get": {
                "summary": "Usage by UTC day and key, from the database",
                "parameters": [{"name": name, "in": "query", "schema": {"type": "string"}}
                               for name in ("from", "to", "tenant")],
                "responses": {"200": _json("{data: rows by day and key, totals by key}"),
                              **_errors(400, 401, 403)}}},
            "/v1/admin/dashboard": _get("The dashboard's figures: an hour of samples",
                                        _json("{points, models, ...}"), 401, 403),
            "/health": _get("Status, models, uptime, memory", _json("Health"), 503),
            "/health/live": _get("Liveness probe", _json("Alive")),
            "/health/ready": _get("Readiness probe", _json("Ready"), 503),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": _get("This document", _json("OpenAPI 3.1")),
        },
    }
