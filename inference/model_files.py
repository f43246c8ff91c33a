"""Reading the small JSON files of a model folder, with errors that name the file, and
keeping every file a model reads inside its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference.errors import ModelLoadError


def inside(folder: Path, name: str | Path) -> Path:
    """`folder / name`, refused when it resolves outside `folder`: an absolute name, `..`, or
    a link to elsewhere (a folder in a shared models directory must not read other files)."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{name} in model folder {folder.name} points outside the folder; "
                             "files a model reads must be inside it (copy linked files in)")
    return path


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
