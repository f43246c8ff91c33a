"""JSON responses serialised with orjson (handles dataclasses and numpy natively)."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(payload), status=status, headers=headers,
                    content_type="application/json")
