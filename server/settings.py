"""Server configuration: one frozen dataclass, filled from flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inference.prepare import default_models_dir


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` and `serve` need. Defaults suit a 2-core laptop."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    chat_models: tuple[Path, ...] = ()
    models_dir: Path = field(default_factory=default_models_dir)
    max_running_per_model: int = 8
    max_waiting_per_model: int = 32
    max_body_bytes: int = 4 * 1024 * 1024
    sse_ping_interval_s: float = 15.0
