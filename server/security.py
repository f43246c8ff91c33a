"""Access control: API keys, CORS and WebSocket origin checks, request ids.

Keys are compared in constant time and never logged. With no keys configured, the server is
open (a local tool's default). CORS answers only origins on the allowlist; the default is
same-origin only. Browsers do not apply CORS to WebSockets, so `/v1/ws` checks Origin itself.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

from server.errors import APIError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class APIKeys:
    """The configured keys; `check` compares in constant time against every one."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, candidate: str | None) -> bool:
        if not self._keys:
            return True
        given = (candidate or "").encode()
        ok = False
        for key in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def check_header(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.check(token.strip())


def unauthorized(provided: bool) -> APIError:
    message = ("Incorrect API key provided" if provided else
               "Missing API key: send 'Authorization: Bearer <key>'")
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and # comments are ignored."""
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]


def same_origin(origin: str, host: str) -> bool:
    return urlsplit(origin).netloc.lower() == host.lower()


def origin_allowed(origin: str | None, host: str, allowlist: Sequence[str]) -> bool:
    """No Origin (not a browser), the same origin, or an allowlisted one."""
    if not origin:
        return True
    return same_origin(origin, host) or origin in allowlist or "*" in allowlist


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-Id when it is sane, else a new one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex
