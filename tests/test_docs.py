"""Every code block the docs say runs (` ```python runs`, ` ```sh runs`, ` ```js runs` in
README.md and docs/) runs, against a real `npugate serve` on a loopback port: the address in
the snippet is swapped for the server's, and nothing else changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LiveServer

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+) runs\n(.*?)^```$", re.M | re.S)
ADDRESS = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Snippet:
    where: str
    lang: str
    code: str


def _snippets() -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Snippet(f"{path.relative_to(REPO)}:{line}", match.group(1),
                                 match.group(2)))
    return found


SNIPPETS = _snippets()


def test_the_docs_have_snippets_that_run() -> None:
    where = {s.where.split(":")[0] for s in SNIPPETS}
    assert {"README.md", "docs/integrations.md"} <= where
    assert {s.lang for s in SNIPPETS} == {"python", "sh", "js"}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, live_server: LiveServer,
                      request: pytest.FixtureRequest) -> None:
    code = snippet.code.replace(ADDRESS, live_server.base_url) \
        .replace("ws://127.0.0.1:8000", live_server.base_url.replace("http", "ws", 1))
    bin_dir = str(Path(sys.executable).parent) + "/"
    env = {**os.environ, "PATH": bin_dir.rstrip("/") + os.pathsep + os.environ["PATH"]}
    if snippet.lang == "python":
        cmd = [sys.executable, "-c", code]
    elif snippet.lang == "sh":
        cmd = ["bash", "-euo", "pipefail", "-c", code.replace(".venv/bin/", bin_dir)]
    else:  # js: an ES module beside the pinned Node SDK, so `import "openai"` finds it
        node_openai: Path = request.getfixturevalue("node_openai")
        script = node_openai / "snippet.mjs"
        script.write_text(code)
        cmd = ["node", str(script)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{snippet.where} failed:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), f"{snippet.where} printed nothing"
    assert '"error"' not in out.stdout, out.stdout
