"""Chooses an execution provider and builds every onnxruntime `InferenceSession` npugate uses.

No other module constructs sessions, so provider choice, threading, static shapes, the QNN
context cache, parity checks and CPU fallback are all decided here.

Embedding encoders: `device="auto"` takes QNN only on a real NPU (the x86 QNN device is a
simulator about 100x slower than the CPU), then CUDA, then CPU; `device="qnn"` asks for QNN even
on the simulator; `device="cpu"` never tries anything else. A QNN session runs static shape
buckets; each bucket must match the CPU within cosine 0.999 at load, or it does not serve.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inference.errors import ModelLoadError
from inference.limits import QnnOptions

log = logging.getLogger(__name__)
QNN = "QNNExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PARITY_MIN_COSINE = 0.999
_qnn_lock = threading.Lock()


@dataclass(frozen=True)
class LoadedSession:
    """A session and the provider that actually runs it."""

    session: ort.InferenceSession
    provider: str


def default_threads() -> int:
    """Intra-op threads: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _session(path: Path, so: ort.SessionOptions, providers: list[str] | None = None
             ) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"onnxruntime could not load {path}: {exc}") from exc


def cpu_session(path: Path, *, threads: int | None = None) -> LoadedSession:
    """Build a CPU session for `path`, raising `ModelLoadError` if onnxruntime rejects it."""
    so = _cpu_options(threads)
    session = _session(path, so, [CPU])
    log.info("loaded %s on %s with %d threads", path, CPU, so.intra_op_num_threads)
    return LoadedSession(session=session, provider=CPU)


@dataclass(frozen=True)
class QnnDevice:
    """What the QNN plugin found."""

    devices: tuple[Any, ...]
    is_real_npu: bool

    @property
    def kind(self) -> str:
        return "npu" if self.is_real_npu else "simulator"


def find_qnn() -> tuple[QnnDevice | None, str]:
    """Register the onnxruntime-qnn plugin (once per process) and report its device.

    Returns (device, "") or (None, why not)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None, "onnxruntime-qnn is not installed (pip install 'npugate[qnn]')"
    with _qnn_lock:
        try:
            ort.register_execution_provider_library(QNN, onnxruntime_qnn.get_library_path())
        except Exception as exc:
            if "already registered" not in str(exc):
                return None, f"registering the QNN plugin failed: {exc}"
    devices = tuple(d for d in ort.get_ep_devices() if d.ep_name == QNN)
    if not devices:
        return None, "the QNN plugin found no device"
    # On x86 the HTP simulator reports a CPU device; a Snapdragon NPU reports type NPU.
    real = any(d.device.type == ort.OrtHardwareDeviceType.NPU for d in devices)
    return QnnDevice(devices=devices, is_real_npu=real), ""


class EncoderSession:
    """Runs an encoder graph on [B, S] token ids and mask; returns its first output.

    Feeds `token_type_ids` (zeros) and `position_ids` (0..S-1) when the graph takes them.
    """

    def __init__(self, loaded: LoadedSession) -> None:
        self._session = loaded.session
        self.provider = loaded.provider
        self.fallback_reason: str | None = None  # QNN was asked for and could not serve
        self.note: str | None = None  # why QNN was not tried
        self.qnn_kind: str | None = None
        self.buckets: tuple[tuple[int, int], ...] = ()
        self.placement: dict[str, dict[str, int]] = {}
        self.runs_by_provider: dict[str, int] = {}
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name

    def feeds(self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
              ) -> dict[str, npt.NDArray[np.int64]]:
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()
        return feeds

    def run(self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
            ) -> npt.NDArray[np.float32]:
        self.runs_by_provider[CPU] = self.runs_by_provider.get(CPU, 0) + 1
        out = self._session.run([self._output], self.feeds(input_ids, mask))[0]
        return np.asarray(out, dtype=np.float32)


class QnnEncoderSession(EncoderSession):
    """QNN buckets for the shapes they fit (and batches up to `max_npu_batch`); CPU otherwise."""

    def __init__(self, cpu: LoadedSession, buckets: dict[tuple[int, int], ort.InferenceSession],
                 qnn: QnnDevice, max_npu_batch: int) -> None:
        super().__init__(cpu)
        self._buckets = dict(sorted(buckets.items()))
        self.buckets = tuple(self._buckets)
        self.placement = {f"{b}x{s}": graph_placement(sess)
                          for (b, s), sess in self._buckets.items()}
        self.provider = QNN
        self.qnn_kind = qnn.kind
        self._max_npu_batch = max_npu_batch

    def run(self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
            ) -> npt.NDArray[np.float32]:
        b, s = input_ids.shape
        fit = next(((bb, ss) for (bb, ss) in self._buckets
                    if bb >= b and ss >= s), None) if b <= self._max_npu_batch else None
        if fit is None:
            return super().run(input_ids, mask)
        padded_ids = np.zeros(fit, dtype=np.int64)
        padded_mask = np.zeros(fit, dtype=np.int64)
        padded_ids[:b, :s], padded_mask[:b, :s] = input_ids, mask
        padded_mask[b:, 0] = 1  # filler rows attend to one token, so no row is all-masked
        session = self._buckets[fit]
        self.runs_by_provider[QNN] = self.runs_by_provider.get(QNN, 0) + 1
        out = session.run(None, self.feeds(padded_ids, padded_mask))[0]
        return np.asarray(out[:b, :s] if out.ndim == 3 else out[:b], dtype=np.float32)


def load_encoder_session(path: Path, *, device: str = "cpu", cache_dir: Path | None = None,
                         max_length: int = 512, qnn: QnnOptions | None = None) -> EncoderSession:
    """Build the encoder session for `device` ("auto", "cpu", "qnn"), falling back to the CPU
    with the reason recorded in `fallback_reason` when QNN cannot serve."""
    cpu = cpu_session(path)
    if device == "cpu":
        return EncoderSession(cpu)
    found, why = find_qnn()
    if found is None or (device == "auto" and not found.is_real_npu):
        if device == "auto" and CUDA in ort.get_available_providers():
            return EncoderSession(_cuda_session(path))
        enc = EncoderSession(cpu)
        if device == "qnn":
            enc.fallback_reason = why
            log.warning("QNN requested for %s but unavailable: %s; using the CPU", path, why)
        elif found is not None:
            enc.qnn_kind = found.kind
            enc.note = ("the QNN device is the HTP simulator (about 100x slower than the "
                        "CPU); device=auto uses QNN only on a real NPU")
            log.info("%s serves on the CPU: %s", path.name, enc.note)
        return enc
    opts = qnn or QnnOptions()
    buckets = [(b, s) for b, s in opts.buckets if s <= max_length]
    cache_dir = cache_dir or path.parent / ".qnn-cache"
    built: dict[tuple[int, int], ort.InferenceSession] = {}
    reasons: list[str] = []
    reference = EncoderSession(cpu)
    for bucket in buckets:
        try:
            session = _qnn_bucket_session(path, bucket, found, cache_dir, opts.extra)
            _check_parity(reference, session, bucket)
        except Exception as exc:
            reasons.append(f"bucket {bucket[0]}x{bucket[1]}: {exc}")
            log.warning("QNN bucket %sx%s of %s does not serve: %s", *bucket, path.name, exc)
            continue
        built[bucket] = session
    if not built:
        enc = EncoderSession(cpu)
        enc.fallback_reason = "; ".join(reasons) or "no QNN bucket fits the model"
        return enc
    log.info("%s serves on QNN (%s) in buckets %s", path.name, found.kind, sorted(built))
    enc = QnnEncoderSession(cpu, built, found, opts.max_npu_batch)
    if reasons:
        enc.fallback_reason = "; ".join(reasons)
    return enc


def _cuda_session(path: Path) -> LoadedSession:
    return LoadedSession(session=_session(path, _cpu_options(None), [CUDA, CPU]), provider=CUDA)


def _qnn_bucket_session(path: Path, bucket: tuple[int, int], qnn: QnnDevice, cache_dir: Path,
                        extra: dict[str, str]) -> ort.InferenceSession:
    batch, seq = bucket
    probe = _session(path, _cpu_options(1), [CPU])
    dims = probe.get_inputs()[0].shape
    cache_dir.mkdir(parents=True, exist_ok=True)
    ctx = cache_dir / f"{path.stem}.b{batch}s{seq}.{qnn.kind}_ctx.onnx"
    for source in ((ctx, path) if ctx.is_file() else (path,)):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for name, value in zip(dims, (batch, seq), strict=False):
            if isinstance(name, str):
                so.add_free_dimension_override_by_name(name, value)
        options = {"backend_type": "htp", **extra}
        if not qnn.is_real_npu:
            options.setdefault("soc_model", "60")  # the simulator needs a target SoC
        so.add_provider_for_devices(list(qnn.devices), options)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if source == path:
            so.add_session_config_entry("ep.context_enable", "1")
            so.add_session_config_entry("ep.context_file_path", str(ctx))
        try:
            session = ort.InferenceSession(str(source), sess_options=so)
        except Exception as exc:
            if source == ctx:  # stale or foreign cache (other SDK or SoC): rebuild it
                log.info("QNN context cache %s unusable (%s); recompiling", ctx.name, exc)
                ctx.unlink(missing_ok=True)
                continue
            raise
        session.disable_fallback()
        placement = graph_placement(session)
        if set(placement) != {QNN}:  # verify, since backend failures only show in the log
            raise RuntimeError(f"the graph is not wholly on QNN: nodes per provider {placement}")
        return session
    raise RuntimeError("unreachable")


def graph_placement(session: ort.InferenceSession) -> dict[str, int]:
    """Nodes per execution provider (the session must record assignment info)."""
    nodes: dict[str, int] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        nodes[subgraph.ep_name] = nodes.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return nodes


def _check_parity(reference: EncoderSession, session: ort.InferenceSession,
                  bucket: tuple[int, int]) -> None:
    batch, seq = bucket
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(1000, 2000, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row in range(batch):  # rows of different lengths, as real batches have
        mask[row, : max(2, seq - row * max(1, seq // (batch + 1)))] = 1
    feeds = reference.feeds(ids, mask)
    want = reference.run(ids, mask)
    got = np.asarray(session.run(None, feeds)[0], dtype=np.float32)
    reference.runs_by_provider.clear()
    for row in range(batch):
        n = int(mask[row].sum())
        a = want[row, :n].ravel() if want.ndim == 3 else want[row]
        b = got[row, :n].ravel() if got.ndim == 3 else got[row]
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        if not cos >= PARITY_MIN_COSINE:
            raise RuntimeError(f"parity check failed: row {row} cosine {cos:.4f} against the "
                               f"CPU (need {PARITY_MIN_COSINE})")
