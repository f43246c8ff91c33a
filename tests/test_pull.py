"""`npugate pull` against a local server in the hub's layout (tests/fake_hub.py), through the
real huggingface_hub client and HF_ENDPOINT: an ONNX folder, a safetensors folder and a GGUF
file, each built by the tests from small real sources; a download that breaks off halfway
and resumes; a file whose bytes do not match the hub's sha256, refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference.prepare.recipes import LLAMA_TOKENIZER, MANIFEST, SMOLLM2_GGUF, downloads_dir
from inference.prepare.sources import fetch
from tests.conftest import REPO, LiveServer
from tests.fake_hub import FakeHub, Repo, folder_files, tiny_gguf


@pytest.fixture(scope="module")
def sources(models_dir: Path, phi3_dir: Path, smollm2_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The repositories' files: a built ONNX folder, a random transformers Phi-3 (safetensors),
    and a tiny GGUF carrying SmolLM2's tokenizer."""
    work = tmp_path_factory.mktemp("hub-sources")
    onnx = {k: v for k, v in folder_files(phi3_dir).items() if k != MANIFEST}
    tok = fetch(LLAMA_TOKENIZER, downloads_dir(models_dir), work / "tokenizer-base.json")
    subprocess.run([sys.executable, "-m", "inference.prepare.convert", "phi3-random", str(tok),
                    str(work / "hf")], check=True, capture_output=True, cwd=REPO)
    source_gguf = fetch(SMOLLM2_GGUF, downloads_dir(models_dir), work / "smollm2.gguf")
    tiny_gguf(source_gguf, work / "tiny.gguf")
    return {"onnx": onnx, "hf": folder_files(work / "hf"),
            "gguf": {"smol-tiny.F32.gguf": (work / "tiny.gguf").read_bytes()}}


@pytest.fixture(scope="module")
def hub(sources: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    fake = FakeHub()
    readme = {"README.md": b"---\nlicense: mit\n---\n# a model\n"}
    fake.repos["tinyco/phi3-tiny-onnx"] = Repo({
        **readme, **{f"cpu-int4/{k}": v for k, v in sources["onnx"].items()},
        **{f"cpu-int4-copy/{k}": v for k, v in sources["onnx"].items()}}, license="mit")
    fake.repos["tinyco/phi3-tiny"] = Repo({**readme, **sources["hf"]}, license="mit")
    gguf_bytes = sources["gguf"]["smol-tiny.F32.gguf"]
    fake.repos["tinyco/smol-tiny-GGUF"] = Repo({"smol-tiny.F32.gguf": gguf_bytes},
                                               cut_once={"smol-tiny.F32.gguf"})
    fake.repos["tinyco/two-ggufs"] = Repo({"a.gguf": gguf_bytes, "b.gguf": gguf_bytes})
    fake.repos["tinyco/tampered"] = Repo({"smol-tiny.F32.gguf": gguf_bytes},
                                         corrupt={"smol-tiny.F32.gguf"})
    yield fake
    fake.close()


def npugate(hub: FakeHub, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with the hub's address and its own cache."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def manifest(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / MANIFEST).read_text())  # type: ignore[no-any-return]


def test_an_onnx_folder_is_pulled_as_published_and_served_on_demand(
        hub: FakeHub, sources: dict[str, dict[str, bytes]], phi3_dir: Path,
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    ambiguous = npugate(hub, tmp_path, "pull", "tinyco/phi3-tiny-onnx", "--models-dir",
                        str(models))
    assert ambiguous.returncode == 1 and "'cpu-int4', 'cpu-int4-copy'" in ambiguous.stderr
    done = npugate(hub, tmp_path, "pull", "tinyco/phi3-tiny-onnx:cpu-int4", "--models-dir",
                   str(models))
    assert done.returncode == 0, done.stderr
    assert "licence: mit" in done.stdout
    folder = models / "phi3-tiny-onnx-cpu-int4"
    for name, data in sources["onnx"].items():
        assert (folder / name).read_bytes() == data and not (folder / name).is_symlink()
    made = manifest(folder)
    assert made["source"]["repo"] == "tinyco/phi3-tiny-onnx"
    assert made["source"]["revision"] == hub.repos["tinyco/phi3-tiny-onnx"].sha
    assert made["license"] == "mit"
    again = npugate(hub, tmp_path, "pull", "tinyco/phi3-tiny-onnx:cpu-int4", "--models-dir",
                    str(models))
    assert again.returncode == 0 and "already prepared" in again.stdout
    server = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "server.log",
                        extra=["--models-dir", str(models)])
    try:
        resp = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "phi3-tiny-onnx-cpu-int4", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()


def test_a_safetensors_folder_is_built_and_checked(hub: FakeHub, tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = npugate(hub, tmp_path, "pull", "tinyco/phi3-tiny", "--precision", "fp32",
                   "--models-dir", str(models))
    assert done.returncode == 0, done.stderr + done.stdout
    folder = models / "phi3-tiny-fp32"
    made = manifest(folder)
    assert made["identity"]["precision"] == "fp32" and made["source"]["kind"] == "safetensors"
    assert made["fidelity"]["top1"] >= 0.99  # fp32 against fp32
    assert made["toolchain"]["onnxruntime-genai"]
    assert (folder / "model.onnx").is_file()
    listed = npugate(hub, tmp_path, "models", "--models-dir", str(models))
    assert "phi3-tiny-fp32" in listed.stdout and "tinyco/phi3-tiny@" in listed.stdout


def test_a_gguf_download_that_breaks_off_resumes(hub: FakeHub, tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = npugate(hub, tmp_path, "pull", "tinyco/smol-tiny-GGUF", "--precision", "fp32",
                   "--models-dir", str(models))
    assert done.returncode == 0, done.stderr + done.stdout
    gets = [(m, r) for m, p, r in hub.requests
            if m == "GET" and p.endswith("/smol-tiny.F32.gguf")]
    assert len(gets) == 2 and gets[0][1] is None and gets[1][1] is not None  # resumed
    size = len(hub.repos["tinyco/smol-tiny-GGUF"].files["smol-tiny.F32.gguf"])
    start = int(gets[1][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= size // 2  # from what the first attempt had written
    folder = models / "smol-tiny.f32-fp32"
    made = manifest(folder)
    assert made["source"]["kind"] == "gguf" and made["fidelity"]["top1"] >= 0.99
    served = hub.repos["tinyco/smol-tiny-GGUF"].files["smol-tiny.F32.gguf"]
    assert made["source"]["files"]["smol-tiny.F32.gguf"] == hashlib.sha256(served).hexdigest()


def test_a_file_that_does_not_match_its_sha256_is_refused(hub: FakeHub, tmp_path: Path
                                                          ) -> None:
    models = tmp_path / "models"
    refused = npugate(hub, tmp_path, "pull", "tinyco/tampered", "--models-dir", str(models))
    assert refused.returncode == 1
    assert "sha256" in refused.stderr and "nothing was built" in refused.stderr
    assert not list(models.glob("*/" + MANIFEST))
    blobs = list((tmp_path / "hf-home").rglob("blobs/*"))
    assert blobs == []  # the bad download is gone: a retry starts clean


def test_a_repository_with_several_ggufs_asks_which(hub: FakeHub, tmp_path: Path) -> None:
    several = npugate(hub, tmp_path, "pull", "tinyco/two-ggufs", "--models-dir",
                      str(tmp_path / "m"))
    assert several.returncode == 1 and "a.gguf, b.gguf" in several.stderr
    missing = npugate(hub, tmp_path, "pull", "tinyco/no-such-model", "--models-dir",
                      str(tmp_path / "m"))
    assert missing.returncode == 1 and "tinyco/no-such-model" in missing.stderr
    bad = npugate(hub, tmp_path, "pull", "not a repo", "--models-dir", str(tmp_path / "m"))
    assert bad.returncode == 1 and "OWNER/NAME" in bad.stderr
