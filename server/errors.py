"""The one place that turns errors into HTTP statuses and OpenAI error bodies.

`APIError` is raised by the server layer itself; `InferenceError`s from `inference/` are mapped
by `to_api_error`. Route code never picks a status code for an engine error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist or is not served here",
                    param="model", code="model_not_found")


def to_api_error(exc: InferenceError) -> APIError:
    """Map the inference layer's exception tree to statuses (400/429/503/500)."""
    if isinstance(exc, ContextTooLong):
        return APIError(400, exc.message, param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidInput):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, Overloaded):
        return APIError(429, exc.message, type="rate_limit_error", code="overloaded",
                        retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendUnavailable | ModelLoadError):
        return APIError(503, exc.message, type="service_unavailable", code="backend_unavailable",
                        retry_after_s=5)
    return APIError(500, exc.message, type="server_error")


def internal_error() -> APIError:
    return APIError(500, "The server had an internal error; see its log", type="server_error")
