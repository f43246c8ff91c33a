"""The QNN execution provider for real, on the HTP simulator, with the tiny BERT fixture.

Each case runs in a fresh process: QNN backend state carries over within a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

if sys.platform == "darwin":  # onnxruntime-qnn publishes no macOS wheels
    pytest.skip("onnxruntime-qnn has no macOS build", allow_module_level=True)

SCRIPT = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from inference.embed.model import EmbeddingModel
from inference.limits import QnnOptions
folder, cache, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if mode == "no-plugin":
    sys.modules["onnxruntime_qnn"] = None  # as if the package were not installed
opts = QnnOptions(buckets=[(1, 16), (2, 16)], max_npu_batch=2,
                  extra={"backend_type": "cpu"} if mode == "bad-backend" else {})
t0 = time.perf_counter()
model = EmbeddingModel.load(folder, device="qnn", cache_dir=cache, qnn=opts)
load_s = time.perf_counter() - t0
cpu = EmbeddingModel.load(folder, device="cpu")
texts = ["hello world", "a somewhat longer sentence"]
ids = model.tokenize(texts)
got = model.embed_batch(ids)
want = cpu.embed_batch(ids)
session = model.session
info = {"provider": model.provider, "qnn_kind": session.qnn_kind,
        "buckets": [list(b) for b in session.buckets], "fallback": session.fallback_reason,
        "runs": session.runs_by_provider, "load_s": load_s,
        "cos": [float(a @ b) for a, b in zip(got, want)], "vectors": [g.tolist() for g in got],
        "ctx_files": sorted(p.name for p in cache.glob("*_ctx.onnx")) if cache.exists() else []}
info["assignments"] = session.placement
print("RESULT " + json.dumps(info))
"""


def _run(folder: Path, cache: Path, mode: str = "qnn") -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(cache), mode],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def first_and_cached(bert_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    cache = tmp_path_factory.mktemp("qnn-cache")
    return _run(bert_tiny_dir, cache), _run(bert_tiny_dir, cache)


def test_qnn_holds_the_whole_graph_and_matches_the_cpu(
        first_and_cached: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, _ = first_and_cached
    assert first["provider"] == "QNNExecutionProvider"
    assert first["qnn_kind"] == "simulator"  # x86: never presented as an NPU
    assert first["buckets"] == [[1, 16], [2, 16]] and first["fallback"] is None
    assert first["runs"] == {"QNNExecutionProvider": 1}  # the batch of 2 ran on QNN
    assert set(first["assignments"]) == {"1x16", "2x16"}
    for bucket, nodes in first["assignments"].items():
        assert set(nodes) == {"QNNExecutionProvider"}, (bucket, nodes)
    assert min(first["cos"]) >= 0.999


def test_context_cache_is_written_and_reloads(
        first_and_cached: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, cached = first_and_cached
    assert len(first["ctx_files"]) == 2
    assert cached["provider"] == "QNNExecutionProvider" and cached["fallback"] is None
    assert cached["vectors"] == first["vectors"]  # bit-identical from the compiled cache


def test_missing_plugin_falls_back_to_cpu(bert_tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(bert_tiny_dir, tmp_path, "no-plugin")
    assert result["provider"] == "CPUExecutionProvider"
    assert "not installed" in result["fallback"]
    assert min(result["cos"]) > 0.99999


def test_failing_qnn_session_falls_back_to_cpu(bert_tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(bert_tiny_dir, tmp_path, "bad-backend")
    assert result["provider"] == "CPUExecutionProvider"
    assert "bucket 1x16" in result["fallback"] and "bucket 2x16" in result["fallback"]
    assert min(result["cos"]) > 0.99999
