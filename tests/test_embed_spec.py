from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference.embed.spec import EmbeddingModelSpec
from inference.errors import ModelLoadError


def test_minilm_declares_mean_pooling_and_normalisation(minilm_dir: Path) -> None:
    spec = EmbeddingModelSpec.from_folder(minilm_dir)
    assert (spec.pooling, spec.normalize, spec.max_length, spec.dimension) == \
        ("mean", True, 256, 384)
    assert not spec.matryoshka


def test_bert_fixture_declares_cls_pooling(bert_tiny_dir: Path) -> None:
    spec = EmbeddingModelSpec.from_folder(bert_tiny_dir)
    assert (spec.pooling, spec.normalize, spec.max_length, spec.dimension) == \
        ("cls", True, 128, 32)


def test_hf_layout_with_onnx_subfolder(minilm_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bge-like"
    shutil.copytree(minilm_dir, folder)
    (folder / "onnx").mkdir()
    (folder / "model.onnx").rename(folder / "onnx" / "model.onnx")
    assert EmbeddingModelSpec.from_folder(folder).onnx_file == folder / "onnx" / "model.onnx"


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json"])
def test_missing_files_are_named(minilm_dir: Path, tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(minilm_dir, folder)
    (folder / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.split(".")[0]):
        EmbeddingModelSpec.from_folder(folder)
