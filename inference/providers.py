"""Chooses an execution provider and builds every onnxruntime `InferenceSession` npugate uses.

No other module constructs sessions, so provider choice, threading and fallback are decided here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from inference.errors import ModelLoadError

log = logging.getLogger(__name__)


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


def cpu_session(path: Path, *, threads: int | None = None) -> LoadedSession:
    """Build a CPU session for `path`, raising `ModelLoadError` if onnxruntime rejects it."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=so,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"onnxruntime could not load {path}: {exc}") from exc
    log.info("loaded %s on CPUExecutionProvider with %d threads", path, so.intra_op_num_threads)
    return LoadedSession(session=session, provider="CPUExecutionProvider")
