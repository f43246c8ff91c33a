"""The one place that turns errors into HTTP statuses and OpenAI error bodies.

Every status the server answers with comes from here: the server layer raises one of the
constructors below (never `APIError(<status>, ...)` itself), `InferenceError`s from
`inference/` are mapped by `to_api_error`, and the framework's own errors (404, 405, 408, 413)
by `from_http_exception`. Every 429 and 503 carries `Retry-After`. A test
(`tests/test_house.py`) fails on a literal status anywhere else in `server/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from werkzeug.exceptions import HTTPException

from inference.errors import (
    BackendUnavailable,
    ContextTooLong,
    InferenceError,
    InvalidInput,
    ModelLoadError,
    Overloaded,
)


@dataclass
class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)  # rate limits' x-ratelimit-*

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return dict(self.extra_headers)
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s))), **self.extra_headers}


RETRY_AFTER_S = 5.0  # what a 503 asks clients to wait when nothing better is known


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(provided: bool) -> APIError:
    message = ("Incorrect API key provided" if provided else
               "Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str, *, code: str, type: str = "invalid_request_error",
              param: str | None = None) -> APIError:
    return APIError(403, message, type=type, code=code, param=param)


def conflict(message: str, *, code: str, param: str | None = None) -> APIError:
    """409: the request clashes with what exists (a key name in use)."""
    return APIError(409, message, code=code, param=param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist or is not served here",
                    param="model", code="model_not_found")


def not_found(message: str, *, param: str | None = None, code: str = "not_found"
              ) -> APIError:
    """Something the request names is not there, or not this key's to see."""
    return APIError(404, message, param=param, code=code)


def too_large(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """A request over one of the server's size or count limits."""
    return APIError(413, message, param=param, code=code)


def unsupported_media_type(message: str) -> APIError:
    return APIError(415, message, code="unsupported_media_type")


def headers_too_large(message: str) -> APIError:
    return APIError(431, message, code="request_header_fields_too_large")


def overloaded(message: str, retry_after_s: float, *, code: str = "overloaded") -> APIError:
    return APIError(429, message, type="rate_limit_error", code=code,
                    retry_after_s=retry_after_s)


def rate_limited(message: str, retry_after_s: float, headers: dict[str, str], *,
                 code: str = "rate_limit_exceeded", retry: bool = True) -> APIError:
    """429 for a tenant over one of its limits (`server.tenants.limits`), with OpenAI's
    x-ratelimit-* `headers`. Retry-After is whole seconds rounded up, and `retry-after-ms`
    (which the OpenAI and Anthropic SDKs read first) is exact; `retry=False` (a quota spent
    until tomorrow) tells the SDKs not to retry at all (`x-should-retry`)."""
    extra = {**headers, "retry-after-ms": str(math.ceil(retry_after_s * 1000))}
    if not retry:
        extra["x-should-retry"] = "false"
    return APIError(429, message, type="insufficient_quota" if code == "insufficient_quota"
                    else "rate_limit_error", code=code, retry_after_s=retry_after_s,
                    extra_headers=extra)


def unavailable(message: str, *, code: str, retry_after_s: float = RETRY_AFTER_S) -> APIError:
    """503: the server cannot serve this now (shutting down, a model loading or failed, no
    memory for it); always with Retry-After."""
    return APIError(503, message, type="service_unavailable", code=code,
                    retry_after_s=retry_after_s)


def probe_status(serving: bool) -> int:
    """A health probe's status: 200 while serving, else 503."""
    return HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
              413: "payload_too_large"}


def from_http_exception(err: HTTPException) -> APIError:
    """The framework's own errors (unknown path, wrong method, slow or large body)."""
    status = err.code or 500
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, err.description or err.name, type=kind, code=HTTP_CODES.get(status))


def to_api_error(exc: InferenceError) -> APIError:
    """Map the inference layer's exception tree to statuses (400/429/503/500)."""
    if isinstance(exc, ContextTooLong):
        return APIError(400, exc.message, param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidInput):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, Overloaded):
        return overloaded(exc.message, exc.retry_after_s)
    if isinstance(exc, BackendUnavailable | ModelLoadError):
        return unavailable(exc.message, code="backend_unavailable")
    return APIError(500, exc.message, type="server_error")


def internal_error() -> APIError:
    return APIError(500, "The server had an internal error; see its log", type="server_error")


# Anthropic's error types by status, and the status Anthropic's clients expect where it
# differs from OpenAI's: 529 for an overloaded service (OpenAI's side says 503)
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                   413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
ANTHROPIC_OVERLOADED = 529


def anthropic_error(err: APIError) -> tuple[int, dict[str, Any]]:
    """An error as Anthropic's API sends it: its status and
    `{"type": "error", "error": {"type", "message"}}`."""
    status = ANTHROPIC_OVERLOADED if err.status == HTTPStatus.SERVICE_UNAVAILABLE \
        else err.status
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": err.message}}
