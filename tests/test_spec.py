from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inference.chat.spec import ChatModelSpec, SamplingDefaults
from inference.errors import ModelLoadError


def test_shapes_and_ids_come_from_the_folder(smollm2_dir: Path, phi3_dir: Path) -> None:
    smol = ChatModelSpec.from_folder(smollm2_dir)
    assert (smol.num_layers, smol.num_kv_heads, smol.head_size) == (30, 3, 64)
    assert smol.context_length == 8192 and smol.eos_token_ids == {2}
    phi = ChatModelSpec.from_folder(phi3_dir)
    assert (phi.num_layers, phi.num_kv_heads, phi.head_size) == (2, 4, 16)
    assert phi.context_length == 4096 and phi.eos_token_ids == {32000, 32001, 32007}
    assert "<|assistant|>" in phi.chat_template


def test_prepared_folders_decode_greedily_by_default(smollm2_dir: Path, phi3_dir: Path) -> None:
    for folder in (smollm2_dir, phi3_dir):  # the builder writes "do_sample": false
        assert ChatModelSpec.from_folder(folder).sampling == SamplingDefaults(temperature=0.0)


@pytest.mark.parametrize(("search", "expected"), [
    (None, SamplingDefaults()),
    ({"do_sample": False, "temperature": 0.6, "top_k": 50}, SamplingDefaults(temperature=0.0)),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50},
     SamplingDefaults(temperature=0.6, top_p=0.9, top_k=50)),
    ({"do_sample": True}, SamplingDefaults()),
    ({"do_sample": True, "temperature": 9, "top_p": 0, "top_k": -1},
     SamplingDefaults(temperature=2.0, top_p=1e-6, top_k=0)),
])
def test_sampling_defaults_from_the_search_section(
        phi3_dir: Path, tmp_path: Path, search: dict[str, object] | None,
        expected: SamplingDefaults) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg.pop("search")
    if search is not None:
        cfg["search"] = search
    (folder / "genai_config.json").write_text(json.dumps(cfg))
    assert ChatModelSpec.from_folder(folder).sampling == expected


def _with_genai_config(phi3_dir: Path, tmp_path: Path,
                       edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the fixture folder whose genai_config.json went through `edit`."""
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    cfg = json.loads((folder / "genai_config.json").read_text())
    edit(cfg)
    (folder / "genai_config.json").write_text(json.dumps(cfg))
    return folder


def test_invalid_search_section_is_a_load_error(phi3_dir: Path, tmp_path: Path) -> None:
    def hot(cfg: dict[str, Any]) -> None:
        cfg["search"]["do_sample"], cfg["search"]["temperature"] = True, "hot"

    folder = _with_genai_config(phi3_dir, tmp_path, hot)
    with pytest.raises(ModelLoadError, match="search section"):
        ChatModelSpec.from_folder(folder)


def test_inline_template_in_tokenizer_config(phi3_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatModelSpec.from_folder(folder).chat_template == template


@pytest.mark.parametrize("missing", ["genai_config.json", "tokenizer.json", "model.onnx",
                                     "chat_template.jinja"])
def test_missing_files_are_named(phi3_dir: Path, tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    (folder / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.split(".")[0]):
        ChatModelSpec.from_folder(folder)


def test_corrupt_config_is_a_load_error(phi3_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    (folder / "genai_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="genai_config.json"):
        ChatModelSpec.from_folder(folder)


@pytest.mark.parametrize("filename", ["/etc/hostname", "../outside.onnx"])
def test_a_model_file_named_outside_the_folder_is_refused(phi3_dir: Path, tmp_path: Path,
                                                          filename: str) -> None:
    def elsewhere(cfg: dict[str, Any]) -> None:
        cfg["model"]["decoder"]["filename"] = filename

    folder = _with_genai_config(phi3_dir, tmp_path, elsewhere)
    shutil.copyfile(folder / "model.onnx", tmp_path / "outside.onnx")
    with pytest.raises(ModelLoadError, match="points outside the folder"):
        ChatModelSpec.from_folder(folder)


def test_a_file_linked_to_elsewhere_is_refused(phi3_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="tokenizer.json in model folder m points outside"):
        ChatModelSpec.from_folder(folder)
    (folder / "tokenizer.json").unlink()  # a link that stays inside is fine
    (folder / "tok.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    (folder / "tokenizer.json").symlink_to(folder / "tok.json")
    assert ChatModelSpec.from_folder(folder).tokenizer_file == folder / "tokenizer.json"
