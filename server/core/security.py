"""Access control: API keys, origin, content-type and host rules, request ids.

Keys are compared in constant time and never logged. With no keys configured, the server is
open (a local tool's default). Each key has its own cache scope (`key_scope`, a hash of the
key): prompt-cache and embedding-cache entries and stored responses made under one key are
invisible to the others, so no key can read or time what another sent, unless keys are
configured to share a scope (`scope=NAME`). With no keys there is one scope. Keys in the
database (`server.tenants.keys`) follow the same rules.

A browser on a foreign page can send a POST without a CORS
preflight (a form or `text/plain` body), so CORS alone does not protect the API: API requests
with a foreign `Origin` are refused (403), and so are bodies that are not `application/json`
(415). Bound to a loopback address, the server answers only to the `Host` names it knows, so a
DNS-rebound name cannot reach it. Browsers do not apply CORS to WebSockets, so `/v1/ws` checks
Origin (and Host) itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from server.core.tenant import OPEN, OPEN_SCOPE, Tenant

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
__all__ = ["OPEN_SCOPE", "APIKeys", "bearer_token", "key_scope", "shared_scope"]


def key_scope(key: str) -> str:
    """The cache scope of an API key: a hash of it, never the key itself."""
    return hashlib.sha256(b"npugate cache scope\0" + key.encode()).hexdigest()[:32]


def shared_scope(name: str) -> str:
    """The cache scope that keys configured with `scope=NAME` share."""
    return key_scope("shared scope\0" + name)


class APIKeys:
    """The configured keys (file, environment, flags), each a tenant with no limits;
    `tenant` compares in constant time against every one.

    An entry is a key, then optionally `scope=NAME`, `name=NAME`, `models=ID,ID` and
    `weight=W`. Keys given the same scope NAME share one scope (a team's common system prompt
    stays cached for all of them, and they see each other's stored responses); every other key
    has its own. `name=` is what /metrics and usage call the key (default: the scope NAME,
    else key-N, its place in the list). `models=` limits the key to those models (others get
    403); without it a key may use any. `weight=` is its share of the fair queues (default
    1)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys: list[tuple[bytes, Tenant]] = []
        for entry in keys:
            if not entry.strip():
                continue
            key, *options = entry.split()
            fields: dict[str, Any] = {"name": f"key-{len(self._keys) + 1}",
                                      "scope": key_scope(key)}
            named = False
            for option in options:
                name, _, value = option.partition("=")
                if name == "scope" and value:
                    fields["scope"] = shared_scope(value)
                    fields["name"] = fields["name"] if named else value
                elif name == "name" and value:
                    fields["name"], named = value, True
                elif name == "models" and value:
                    fields["models"] = frozenset(m for m in value.split(",") if m)
                elif name == "weight" and _positive(value):
                    fields["weight"] = float(value)
                else:
                    raise ValueError(f"unknown key option {option!r}: use scope=NAME, "
                                     "name=NAME, models=ID,ID or weight=W")
            self._keys.append((key.encode(), Tenant(**fields)))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> list[Tenant]:
        return [tenant for _, tenant in self._keys]

    def tenant(self, candidate: str | None) -> Tenant | None:
        """The tenant of a valid key (`OPEN` when no keys are configured), else None."""
        if not self._keys:
            return OPEN
        given = (candidate or "").encode()
        found: Tenant | None = None
        for key, tenant in self._keys:  # no early exit: timing does not reveal which matched
            if hmac.compare_digest(given, key):
                found = tenant
        return found

    def check(self, candidate: str | None) -> bool:
        return self.tenant(candidate) is not None

    def check_header(self, authorization: str | None) -> bool:
        """Whether an `Authorization: Bearer` header carries a valid key."""
        token = bearer_token(authorization)
        return self.tenant(token) is not None if token is not None or not self._keys \
            else False


def bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer KEY` header; None without one."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _positive(value: str) -> bool:
    try:
        return float(value) > 0
    except ValueError:
        return False


def read_key_file(path: str) -> list[str]:
    """One key per line, optionally followed by `scope=NAME` (`APIKeys`); blank lines and #
    comments are ignored."""
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]


def same_origin(origin: str, host: str) -> bool:
    return urlsplit(origin).netloc.lower() == host.lower()


def origin_allowed(origin: str | None, host: str, allowlist: Sequence[str]) -> bool:
    """No Origin (not a browser), the same origin, or an allowlisted one."""
    if not origin:
        return True
    return same_origin(origin, host) or origin in allowlist or "*" in allowlist


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(address: str) -> bool:
    """Whether the server's bind address is a loopback one (only local clients reach it)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """A Host header naming this machine (loopback names and addresses) or an allowed name.
    `*` in `allowed` turns the check off."""
    if "*" in allowed:
        return True
    name = host_name(host or "")
    return name in LOOPBACK_NAMES or name in (a.lower() for a in allowed) or is_loopback(name)


def is_json(content_type: str | None) -> bool:
    """`application/json`, with or without parameters such as charset."""
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-Id when it is sane, else a new one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex
