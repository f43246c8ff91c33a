"""Shared fixtures: real models built from registry packages (cached between runs), the
one engine factory and the one `app` fixture (both read `Settings`, as the server does), and
a real server process on a loopback port."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from quart import Quart

from inference.chat.engine import ChatEngine
from inference.chat.model import ChatModel
from inference.embed.batcher import EmbeddingBatcher
from inference.embed.model import EmbeddingModel
from inference.prepare import default_models_dir
from inference.prepare.recipes import RECIPES, build_model
from server.app import create_app
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Stored responses go to a folder of this run's, never the user's data directory
    (servers started by tests inherit it)."""
    folder = tmp_path_factory.mktemp("data")
    old = os.environ.get("NPUGATE_DATA_DIR")
    os.environ["NPUGATE_DATA_DIR"] = str(folder)
    yield folder
    if old is None:
        del os.environ["NPUGATE_DATA_DIR"]
    else:
        os.environ["NPUGATE_DATA_DIR"] = old


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # Quart and Hypercorn run on asyncio


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return default_models_dir()


def _built(models_dir: Path, name: str) -> Path:
    return build_model(RECIPES[name], models_dir, lambda msg: print(msg, flush=True))


@pytest.fixture(scope="session")
def smollm2_dir(models_dir: Path) -> Path:
    return _built(models_dir, "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def phi3_dir(models_dir: Path) -> Path:
    return _built(models_dir, "phi3-tiny-random")


@pytest.fixture(scope="session")
def minilm_dir(models_dir: Path) -> Path:
    return _built(models_dir, "all-minilm-l6-v2")


@pytest.fixture(scope="session")
def bert_tiny_dir(models_dir: Path) -> Path:
    return _built(models_dir, "bert-tiny-cls-random")


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> EmbeddingModel:
    return EmbeddingModel.load(minilm_dir)


@pytest.fixture(scope="session")
def bert_tiny(bert_tiny_dir: Path) -> EmbeddingModel:
    return EmbeddingModel.load(bert_tiny_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> ChatModel:
    return ChatModel.load(smollm2_dir)


@pytest.fixture(scope="session")
def phi3(phi3_dir: Path) -> ChatModel:
    return ChatModel.load(phi3_dir)


def chat_engine(model: ChatModel, settings: Settings | None = None, **overrides: Any
                ) -> ChatEngine:
    """The engine the server would build for `model` from `settings` (the defaults when
    None), with `overrides` of its `ChatLimits` on top."""
    limits = (settings or Settings()).limits().chat
    return ChatEngine(model, dataclasses.replace(limits, **overrides))


def embedding_batcher(model: EmbeddingModel, settings: Settings | None = None,
                      **overrides: Any) -> EmbeddingBatcher:
    """The batcher the server would build for `model` (see `chat_engine`)."""
    limits = (settings or Settings()).limits().embedding
    return EmbeddingBatcher(model, dataclasses.replace(limits, **overrides))


@asynccontextmanager
async def running(engine: ChatEngine) -> AsyncIterator[ChatEngine]:
    """`engine`, running in a task group until the block ends."""
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        yield engine
        tg.cancel_scope.cancel()


@asynccontextmanager
async def serving(settings: Settings | None = None, *, chat: Sequence[ChatModel] = (),
                  embedding: Sequence[EmbeddingModel] = ()) -> AsyncIterator[Quart]:
    """The app, started, serving models already loaded, with the engines loading them would
    build from `settings`."""
    settings = settings or Settings()
    app = create_app(settings, engines=[chat_engine(m, settings) for m in chat],
                     batchers=[embedding_batcher(m, settings) for m in embedding])
    async with app.test_app():
        yield app


@pytest.fixture
async def app(request: pytest.FixtureRequest) -> AsyncIterator[Quart]:
    """The app, served in-process. What it serves comes from the closest `app` marker:
    `pytest.mark.app(settings={...}, chat=("phi3",), embedding=("bert_tiny",))`, fixture names
    of models; by default the Phi-3 fixture and bert-tiny under the default settings."""
    marker = request.node.get_closest_marker("app")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    chat = [request.getfixturevalue(name) for name in options.get("chat", ("phi3",))]
    embedding = [request.getfixturevalue(name)
                 for name in options.get("embedding", ("bert_tiny",))]
    async with serving(Settings(**options.get("settings", {})), chat=chat,
                       embedding=embedding) as served:
        yield served


def greedy_reference(model: ChatModel, messages: list[dict[str, str]], max_tokens: int
                     ) -> tuple[str, str]:
    """What a server must answer greedily, taken from the model itself: the plain loop's
    text and finish reason. Tests hold served output to this, never to what one build of a
    model happens to know."""
    ids, ended = model.greedy(model.encode_prompt(messages), max_tokens)
    return model.tokenizer.decode(ids, skip_special_tokens=True), "stop" if ended else "length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`npugate serve` in its own process, as a user runs it."""

    def __init__(self, *, chat: list[Path], embedding: list[Path], log: Path,
                 extra: list[str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server", "--port", str(self.port), "--log-level",
                "warning", *(extra or [])]
        for d in chat:
            args += ["--chat-model", str(d)]
        for d in embedding:
            args += ["--embedding-model", str(d)]
        self._log = log.open("w")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready: {log.read_text()}")

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.base_url + "/health", timeout=5).json()  # type: ignore[no-any-return]

    def model_stats(self, model: str) -> dict[str, Any]:
        (entry,) = [m for m in self.health()["models"] if m["id"] == model]
        return entry  # type: ignore[no-any-return]

    def leave_mid_stream(self, path: str, body: dict[str, Any], marker: str,
                         model: str) -> None:
        """Stream `body` to `path`, hang up at the first line holding `marker`, and check
        that the generation is cancelled and nothing is left running."""
        before = self.model_stats(model)["stats"]["cancelled_total"]
        with httpx.stream("POST", self.base_url + path, json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if marker in line:
                    break
        for _ in range(100):
            if self.model_stats(model)["stats"]["cancelled_total"] > before:
                break
            time.sleep(0.1)
        entry = self.model_stats(model)
        assert entry["stats"]["cancelled_total"] == before + 1
        assert entry["requests_running"] == 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# npm packages the client tests run, pinned: the official Node SDK, zod (for its zodFunction
# helper) and the Vercel AI SDK with its OpenAI provider
NODE_PACKAGES = {"openai": "7.59.0", "zod": "4.6.7", "ai": "7.0.185", "@ai-sdk/openai": "4.0.126"}


# Codex CLI, which speaks only the Responses API
CODEX_PACKAGES = {"@openai/codex": "0.171.0"}


def _npm_folder(packages: dict[str, str]) -> Path:
    """A folder with pinned npm packages, installed from the npm registry once and cached:
    a script written into it imports them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("the Node client tests need node and npm (apt-get install nodejs "
                           "npm)")
    specs = [f"{name}@{version}" for name, version in packages.items()]
    key = hashlib.sha256(" ".join(specs).encode()).hexdigest()[:12]
    folder = default_models_dir().parent / "node" / f"packages-{key}"
    if not (folder / "installed").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund",
                        "--prefix", str(folder), *specs], check=True, timeout=600)
        (folder / "installed").write_text(" ".join(specs))
    return folder


@pytest.fixture(scope="session")
def node_openai() -> Path:
    return _npm_folder(NODE_PACKAGES)


@pytest.fixture(scope="session")
def node_codex() -> Path:
    return _npm_folder(CODEX_PACKAGES)


# Python clients whose pins clash with the dev environment's openai run from their own
# virtual environment, built from PyPI once and cached, as an application would install them:
# instructor 1.17 pins jiter<0.15, and the openai release in .venv needs jiter>=0.16
INSTRUCTOR_PACKAGES = ["instructor==1.17.0"]


@pytest.fixture(scope="session")
def instructor_python() -> Path:
    """The Python interpreter of a cached virtual environment holding instructor."""
    key = hashlib.sha256(" ".join(INSTRUCTOR_PACKAGES).encode()).hexdigest()[:12]
    folder = default_models_dir().parent / "venvs" / f"instructor-{key}"
    python = folder / "bin" / "python"
    if not (folder / "installed").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *INSTRUCTOR_PACKAGES], check=True, timeout=600)
        (folder / "installed").write_text(" ".join(INSTRUCTOR_PACKAGES))
    return python


@pytest.fixture(scope="module")
def live_server(smollm2_dir: Path, phi3_dir: Path, minilm_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(chat=[smollm2_dir, phi3_dir], embedding=[minilm_dir],
                        log=tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()
