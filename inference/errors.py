"""The inference layer's exception tree. The server maps these to HTTP statuses in one place.

    InferenceError
    ├── InvalidInput            the request cannot be served as given
    │   └── ContextTooLong      prompt (+ requested completion) exceeds the model's context
    ├── Overloaded              a bounded queue is full; retry later
    ├── BackendUnavailable      the engine is not running (loading, failed, shutting down)
    └── ModelLoadError          a model folder is missing, incomplete or unreadable
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error the inference layer raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(InferenceError):
    """The input is malformed or outside what the model accepts."""


class ContextTooLong(InvalidInput):
    """The prompt, or prompt plus max_tokens, does not fit the model's context window."""


class Overloaded(InferenceError):
    """The engine's queue is full."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(InferenceError):
    """The engine cannot take work right now."""


class ModelLoadError(InferenceError):
    """A model folder could not be loaded."""
