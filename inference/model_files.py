"""Reading the small JSON files of a model folder, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference.errors import ModelLoadError


def read_json(path: Path, *, required: bool = False) -> Any:
    """The parsed file, or None if it is absent and not `required`."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc


def json_object(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A JSON object file ({} when absent and optional)."""
    data = read_json(path, required=required)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def json_list(path: Path) -> list[dict[str, Any]]:
    """The objects of an optional JSON list file ([] when absent)."""
    data = read_json(path)
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
