"""A tenant: what one API key is and may do. Keys from the key file and the environment are
tenants with no limits (`server.core.security.APIKeys`); keys in the database
(`server.tenants.keys`) carry theirs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OPEN_SCOPE = ""  # the one cache scope of a server with no keys


@dataclass(frozen=True)
class Limits:
    """0 means no limit. Rates are per replica; quotas count in the database, so replicas
    sharing PostgreSQL share them (docs/tenants.md)."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0  # prompt (cached included) and generated
    tokens_per_day: int = 0  # UTC days
    tokens_per_month: int = 0  # UTC calendar months
    max_concurrent: int = 0  # generations (chat, completions, responses, messages, embeddings)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        return cls(**{k: int(data.get(k) or 0) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Tenant:
    name: str  # what /metrics, usage and the dashboard call it; never the key
    scope: str  # its cache scope (server.core.security.key_scope)
    models: frozenset[str] | None = None  # the models it may use; None: every one
    limits: Limits = field(default_factory=Limits)
    weight: float = 1.0  # its share of the fair queues, against weight 1
    key_id: str | None = None  # a database key's id


OPEN = Tenant("open", OPEN_SCOPE)  # every caller of a server with no keys
