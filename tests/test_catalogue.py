"""Which folders the server serves: prepared ones stay inside the models directory."""

from __future__ import annotations

import json
from pathlib import Path

from server.core.catalogue import MANIFEST, Catalogue
from server.core.registry import without_paths


def _prepared(folder: Path, model_id: str) -> None:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"id": model_id, "task": "chat"}))


def test_a_folder_linked_from_outside_the_models_directory_is_not_served(tmp_path: Path
                                                                         ) -> None:
    models = tmp_path / "models"
    _prepared(models / "inside", "inside")
    _prepared(tmp_path / "elsewhere" / "outside", "outside")
    (models / "linked").symlink_to(tmp_path / "elsewhere" / "outside")
    assert [e.id for e in Catalogue([], models).prepared()] == ["inside"]


def test_callers_see_load_errors_without_the_server_s_paths() -> None:
    message = "/home/me/.cache/npugate/models/m/model.onnx is missing; see /var/log/x.log"
    assert without_paths(message) == "model.onnx is missing; see x.log"
