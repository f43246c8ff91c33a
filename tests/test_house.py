"""The house rules of `server/` (docs/architecture.md), checked on the source: statuses come
from the one error map, every default is declared once, the command line loads no runtime,
and the shared core imports no API surface."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.chat.engine import ChatEngine
from inference.embed.batcher import EmbeddingBatcher
from inference.limits import ChatLimits, EmbeddingLimits, QnnOptions
from server.cli import NUMBER_FLAGS, _parser
from server.core.registry import ModelRegistry
from server.openai.chat import ChatService
from server.openai.completions import CompletionService
from server.openai.embeddings import EmbeddingService
from server.settings import Settings
from server.ws.session import SocketLimits

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "server"
ERROR_MAP = SERVER / "core" / "errors.py"
# Calls that pick a response's status
STATUS_CALLS = {"APIError", "Response", "json_response", "make_response", "abort"}
SURFACES = ("server.openai", "server.responses", "server.messages", "server.ws", "server.ops")


def _modules() -> list[Path]:
    return sorted(SERVER.rglob("*.py"))


def _literal_statuses(tree: ast.AST) -> list[int]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else \
            getattr(node.func, "id", "")
        picked = [kw.value for kw in node.keywords if kw.arg in ("status", "status_code")]
        if name in STATUS_CALLS:
            picked += [*node.args]
        for arg in picked:
            found += [n.lineno for n in ast.walk(arg) if isinstance(n, ast.Constant)
                      and type(n.value) is int and 100 <= n.value <= 599]
    return found


def test_every_status_comes_from_the_error_map() -> None:
    offenders = {str(p.relative_to(REPO)): lines for p in _modules() if p != ERROR_MAP
                 and (lines := _literal_statuses(ast.parse(p.read_text())))}
    assert not offenders, f"literal HTTP statuses outside server/core/errors.py: {offenders}"


def test_the_status_check_catches_a_literal() -> None:
    assert _literal_statuses(ast.parse("raise APIError(503, 'x')")) == [1]
    assert _literal_statuses(ast.parse("json_response(b, 200 if ok else 503)")) == [1, 1]
    assert _literal_statuses(ast.parse("Response('', status=HTTPStatus.NO_CONTENT)")) == []


def test_every_default_is_declared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("NPUGATE_")]:
        monkeypatch.delenv(name)
    defaults = Settings()
    # the command line's defaults are the settings'
    args = _parser().parse_args(["serve"])
    for _, field, _, _ in NUMBER_FLAGS:
        assert getattr(args, field) == getattr(defaults, field), field
    for arg, field in (("host", "host"), ("port", "port"), ("log_level", "log_level"),
                       ("embedding_device", "embedding_device"), ("qnn_buckets", "qnn_buckets"),
                       ("models_dir", "models_dir"), ("prompt_cache", "prompt_cache"),
                       ("protect_health", "protect_health")):
        assert getattr(args, arg) == getattr(defaults, field), field
    # the settings build exactly the engines' defaults, and the registry reads the settings
    limits = defaults.limits()
    assert limits.chat == ChatLimits() and limits.embedding == EmbeddingLimits()
    assert limits.qnn.buckets == QnnOptions().buckets
    assert limits.qnn.max_npu_batch == QnnOptions().max_npu_batch
    assert ModelRegistry().limits == limits
    assert defaults.ws_max_conversations == ChatLimits().max_running
    # and nothing else declares one: limits are taken whole, or required
    assert list(inspect.signature(ChatEngine).parameters) == ["model", "limits", "on_run"]
    assert "max_batch_size" not in inspect.signature(EmbeddingBatcher).parameters
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(SocketLimits))
    for service, names in ((ChatService, ("max_messages", "max_tokens_limit")),
                           (CompletionService, ("max_tokens_limit",)),
                           (EmbeddingService, ("max_inputs",))):
        params = inspect.signature(service).parameters
        assert all(params[n].default is inspect.Parameter.empty for n in names), service


def test_the_command_line_loads_no_runtime() -> None:
    heavy = ("onnxruntime", "llguidance", "tokenizers", "inference.chat.engine")
    code = ("import sys, server.cli, server.settings; server.cli._parser(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_core_imports_no_api_surface() -> None:
    """A new protocol is a package beside server/openai that the core never needs to know."""
    for path in (SERVER / "core").glob("*.py"):
        upward = {m for m in _imports(path) if m.startswith(SURFACES)}
        assert not upward, f"{path.relative_to(REPO)} imports {upward}"
    for path in [*(REPO / "inference").rglob("*.py")]:
        assert not {m for m in _imports(path) if m.startswith(("server", "clients"))}, path
