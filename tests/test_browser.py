"""End to end in a real headless browser: Debian's Chromium driven by playwright-python.

Loads the chat page from `npugate serve`, sends a prompt from the keyboard, watches tokens
arrive one after another, presses Stop, and checks on the server that generation stopped.
Screenshots go to test-output/browser/. Without a browser it skips, unless
NPUGATE_REQUIRE_BROWSER=1 (as CI sets), where it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUT = REPO / "test-output" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        message = "no chromium on PATH (apt-get install chromium)"
        if os.environ.get("NPUGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(chat=[smollm2_dir], embedding=[],
                      log=tmp_path_factory.mktemp("browser") / "server.log")
    yield live
    live.stop()


def _smol(server: LiveServer) -> dict[str, Any]:
    entry = server.health()["models"][0]
    return {**entry["stats"], "running": entry["requests_running"]}


def test_page_streams_tokens_and_stops(chromium: str, server: LiveServer) -> None:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    before = _smol(server)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 420, "height": 760})  # a narrow window
        page.goto(server.base_url + "/")
        page.wait_for_selector("#status.ok", timeout=15000)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        assert page.input_value("#model") == "smollm2-135m-instruct"
        page.evaluate("""() => {
            window.__updates = [];
            new MutationObserver(() => {
                const el = document.querySelector('.msg.assistant');
                if (el) window.__updates.push([performance.now(), el.textContent.length]);
            }).observe(document.getElementById('transcript'),
                       {childList: true, subtree: true, characterData: true});
        }""")
        page.focus("#prompt")
        page.keyboard.type("Write a long story about a dragon who learns to bake bread.")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "Number(document.querySelector('.msg.assistant')?.getAttribute('data-chunks')"
            " || 0) >= 25", timeout=30000)
        page.screenshot(path=str(OUT / "streaming.png"))
        updates = page.evaluate("window.__updates")
        lengths = sorted({n for _, n in updates if n > 0})
        span_ms = updates[-1][0] - updates[0][0]
        assert len(lengths) >= 10 and span_ms > 100, (len(lengths), span_ms)  # not all at once
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-done='cancelled']", timeout=10000)
        page.screenshot(path=str(OUT / "stopped.png"))
        stopped_text = page.text_content(".msg.assistant")
        assert stopped_text and "stopped" in stopped_text

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _smol(server)["running"]:
            time.sleep(0.05)
        after = _smol(server)
        assert after["running"] == 0
        assert after["cancelled_total"] == before["cancelled_total"] + 1
        steps = after["decode_runs_total"]
        time.sleep(0.5)
        assert _smol(server)["decode_runs_total"] == steps  # decoding really stopped
        assert steps - before["decode_runs_total"] < 1024  # well short of max_tokens

        # the conversation goes on: a second turn carries the first as history
        page.fill("#prompt", "Now say hello in one word.")
        page.click("#send")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant[data-done]').length == 2", timeout=30000)
        assert page.locator(".msg.user").count() == 2
        assert "time to first token" in (page.text_content("#stats") or "")
        page.screenshot(path=str(OUT / "second-turn.png"))
        browser.close()


def test_page_reconnects_after_the_server_comes_back(chromium: str, phi3_dir: Path,
                                                     tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    first = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "first.log")
    second: LiveServer | None = None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(first.base_url + "/")
            page.wait_for_selector("#status.ok", timeout=15000)
            first.stop()
            page.wait_for_selector("#status.bad", timeout=10000)
            assert "retrying" in (page.text_content("#status") or "")
            second = LiveServer(chat=[phi3_dir], embedding=[], log=tmp_path / "second.log",
                                port=first.port)
            page.wait_for_selector("#status.ok", timeout=20000)  # reconnected by itself
            page.fill("#prompt", "hello again")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant[data-done]", timeout=20000)
            assert page.get_attribute(".msg.assistant", "data-done") in ("stop", "length")
            page.screenshot(path=str(OUT / "reconnected.png"))
            browser.close()
    finally:
        if second is not None:
            second.stop()


def test_the_dashboard_plots_live_figures(chromium: str, phi3_dir: Path, minilm_dir: Path,
                                          tmp_path: Path) -> None:
    """Two keys send chats and embeddings; the dashboard, opened with the admin key, shows
    live tiles, draws its charts and lists both keys' usage. A screenshot is kept."""
    import httpx
    from playwright.sync_api import sync_playwright

    (tmp_path / "admin").write_text("admin-key-for-the-dashboard\n")
    (tmp_path / "keys").write_text("sk-ann name=ann\nsk-ben name=ben\n")
    server = LiveServer(chat=[phi3_dir], embedding=[minilm_dir], log=tmp_path / "server.log",
                        extra=["--admin-key-file", str(tmp_path / "admin"),
                               "--api-key-file", str(tmp_path / "keys"),
                               "--dashboard-sample", "1"])
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # traffic over several samples
            for key in ("sk-ann", "sk-ben"):
                headers = {"Authorization": f"Bearer {key}"}
                assert httpx.post(server.base_url + "/v1/chat/completions", headers=headers,
                                  timeout=30, json={
                                      "model": "phi3-tiny-random", "max_tokens": 16, "messages": [
                                          {"role": "user", "content": "hello"}]}).is_success
                assert httpx.post(server.base_url + "/v1/embeddings", headers=headers,
                                  timeout=30, json={"model": "all-minilm-l6-v2",
                                                    "input": "the same words"}).is_success
        figures = httpx.get(server.base_url + "/v1/admin/dashboard", timeout=10, headers={
            "Authorization": "Bearer admin-key-for-the-dashboard"}).json()
        assert any(p["tokens_per_s"] > 0 for p in figures["points"])
        assert any(p["ttft_p50_ms"] for p in figures["points"])
        assert any(p["embedding_cache_hit_rate"] for p in figures["points"])
        assert httpx.get(server.base_url + "/v1/admin/dashboard", timeout=10).status_code == 401
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", lambda route: route.abort()
                       if not route.request.url.startswith(server.base_url)
                       else route.continue_())  # offline: nothing but the server
            page.goto(server.base_url + "/dashboard#key=admin-key-for-the-dashboard")
            page.wait_for_selector("#status.ok", timeout=15_000)
            assert "#key=" not in page.url  # the key leaves the address bar
            assert page.locator("#keys tr[data-key=ann]").count() == 1
            assert page.locator("#keys tr[data-key=ben]").count() == 1
            requests = int(page.locator("#keys tr[data-key=ann] td").nth(1).inner_text())
            assert requests >= 2
            assert page.locator(".tile[data-label='models loaded'] .value").inner_text() == "2"
            assert page.locator("#models tbody tr").count() == 2
            assert page.locator("figure canvas").count() == 9
            # the tokens/s chart has drawn a line: some pixel is the first series' blue
            drawn = page.evaluate("""() => {
                const c = document.querySelector('#chart-tps canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                for (let i = 0; i < d.length; i += 4)
                    if (d[i] === 37 && d[i + 1] === 99 && d[i + 2] === 235) return true;
                return false; }""")
            assert drawn
            OUT.mkdir(parents=True, exist_ok=True)
            shot = page.screenshot(path=str(OUT / "dashboard.png"), full_page=True)
            assert len(shot) > 20_000
            browser.close()
    finally:
        server.stop()
