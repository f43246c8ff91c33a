"""`npugate chat` as a user runs it: a real process, stdin/stdout, SIGINT for Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, LiveServer


class Terminal:
    def __init__(self, server: LiveServer, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "chat", "--url", server.base_url, *args],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while ch := self.proc.stdout.read(1):
            self.out += ch

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.out.count(text) < count:
            assert time.monotonic() < deadline, f"no {text!r} in {self.out!r}"
            time.sleep(0.02)

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=15)
        self._reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.mark.parametrize("transport", [[], ["--sse"]], ids=["websocket", "sse"])
def test_two_turns_then_quit(live_server: LiveServer, transport: list[str]) -> None:
    term = Terminal(live_server, "--model", "phi3-tiny-random", "--max-tokens", "5", *transport)
    term.type("hello")
    term.wait_for("you> ", count=2)
    term.type("again")
    term.wait_for("you> ", count=3)
    assert term.quit() == 0
    assert term.out.count("assistant> ") == 2


@pytest.mark.parametrize("transport", [[], ["--sse"]], ids=["websocket", "sse"])
def test_ctrl_c_stops_the_answer_not_the_program(live_server: LiveServer,
                                                 transport: list[str]) -> None:
    def cancelled() -> int:
        entry = next(m for m in live_server.health()["models"]
                     if m["id"] == "smollm2-135m-instruct")
        return int(entry["stats"]["cancelled_total"])

    before = cancelled()
    term = Terminal(live_server, "--model", "smollm2-135m-instruct", "--max-tokens", "2000",
                    *transport)
    term.type("Write a very long story about the sea.")
    term.wait_for("assistant> ")
    deadline = time.monotonic() + 20
    while len(term.out.split("assistant> ", 1)[1]) < 40:  # some tokens streamed
        assert time.monotonic() < deadline
        time.sleep(0.02)
    term.proc.send_signal(signal.SIGINT)
    term.wait_for("[stopped]")
    term.wait_for("you> ", count=2)  # back at the prompt, still running
    assert term.proc.poll() is None
    deadline = time.monotonic() + 10
    while cancelled() < before + 1:
        assert time.monotonic() < deadline, "the server kept generating"
        time.sleep(0.05)
    assert term.quit() == 0
