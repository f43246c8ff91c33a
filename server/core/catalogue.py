"""The models this server can serve: those it was started with, and every model prepared in
its models directory (`npugate prepare NAME`), found again on each lookup so that a model
prepared while the server runs is usable at once.

A prepared folder is one with `npugate-manifest.json`, which `npugate prepare` writes last
(its `id` and `task`). Nothing here loads anything (see `server/core/loader.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Task = Literal["chat", "embedding"]
MANIFEST = "npugate-manifest.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    task: Task
    path: Path


def read_manifest(folder: Path) -> tuple[str, Task | None]:
    """A folder's served id and task from its manifest; else its name and no task."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        task = manifest.get("task")
        return str(manifest["id"]), task if task in ("chat", "embedding") else None
    except (OSError, ValueError, KeyError, AttributeError):
        return folder.name, None


class Catalogue:
    """Configured folders (by task) first, then the prepared models of `models_dir`."""

    def __init__(self, configured: list[tuple[Path, Task]], models_dir: Path | None) -> None:
        self.models_dir = models_dir
        self._configured: list[CatalogueEntry] = []
        taken: set[str] = set()
        for folder, task in configured:
            model_id, _ = read_manifest(folder)
            if model_id in taken:  # two folders with one id: the second is told apart
                model_id = f"{model_id}-{len(taken)}"
            taken.add(model_id)
            self._configured.append(CatalogueEntry(model_id, task, folder))

    @property
    def configured(self) -> list[CatalogueEntry]:
        return list(self._configured)

    def prepared(self) -> list[CatalogueEntry]:
        """Every prepared model in the models directory (read now, not cached)."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        found = []
        root = self.models_dir.resolve()
        for folder in sorted(self.models_dir.iterdir()):
            if folder.is_dir() and not folder.resolve().is_relative_to(root):
                log.warning("%s links outside the models directory: not served", folder.name)
                continue
            if folder.is_dir() and (folder / MANIFEST).is_file():
                model_id, task = read_manifest(folder)
                if task is not None:
                    found.append(CatalogueEntry(model_id, task, folder))
        return found

    def all(self) -> list[CatalogueEntry]:
        """Configured models, then prepared ones not configured under the same id."""
        entries = self.configured
        ids = {e.id for e in entries}
        paths = {e.path.resolve() for e in entries}
        for entry in self.prepared():
            if entry.id not in ids and entry.path.resolve() not in paths:
                entries.append(entry)
                ids.add(entry.id)
        return entries

    def find(self, model_id: str) -> CatalogueEntry | None:
        return next((e for e in self.all() if e.id == model_id), None)
