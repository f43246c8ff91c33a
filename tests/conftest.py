"""Shared fixtures: real models built from registry packages (cached between runs), loaded
engines, and a real server process on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference.chat.model import ChatModel
from inference.embed.model import EmbeddingModel
from inference.prepare import default_models_dir
from inference.prepare.recipes import RECIPES, build_model

REPO = Path(__file__).resolve().parents[1]


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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def live_server(smollm2_dir: Path, phi3_dir: Path, minilm_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(chat=[smollm2_dir, phi3_dir], embedding=[minilm_dir],
                        log=tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()
