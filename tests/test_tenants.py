"""Tenants (issue 25): keys in the database, managed through the admin API and `npugate keys`;
per-key models, rate limits with OpenAI's headers, quotas, concurrency caps; caches that stay
within a key; usage by day. A real server process, real clients."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from inference.chat.model import ChatModel
from server.core.database import SQLITE_FILE
from server.core.tenant import Limits, Tenant
from server.settings import Settings
from server.tenants.limits import Bucket, Gate, duration
from tests.conftest import REPO, LiveServer, serving

ADMIN = "admin-test-key-0123"
PHI3 = "phi3-tiny-random"
EMBED = "all-minilm-l6-v2"
LONG = [{"role": "user", "content": "lighthouse keeper " * 80}]  # > 2 prefill chunks


@pytest.fixture(scope="module")
def tenant_server(phi3_dir: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[LiveServer, Path]]:
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "admin-keys").write_text(ADMIN + "\n")
    server = LiveServer(chat=[phi3_dir], embedding=[minilm_dir], log=folder / "server.log",
                        extra=["--admin-key-file", str(folder / "admin-keys"),
                               "--data-dir", str(folder / "data")])
    try:
        yield server, folder / "data"
    finally:
        server.stop()


def npugate(server: LiveServer, *args: str) -> str:
    """`npugate keys ...` / `npugate usage ...`, as an operator types it."""
    done = subprocess.run([sys.executable, "-m", "server.cli", *args, "--url", server.base_url,
                           "--admin-key", ADMIN], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def create(server: LiveServer, name: str, **fields: Any) -> str:
    resp = httpx.post(server.base_url + "/v1/admin/keys", json={"name": name, **fields},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


def sdk(server: LiveServer, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, **options)


def chat(server: LiveServer, key: str, messages: list[dict[str, str]] | None = None,
         max_tokens: int = 2) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": PHI3, "max_tokens": max_tokens,
                            "messages": messages or [{"role": "user", "content": "hi"}]})


def test_keys_from_the_command_line(tenant_server: tuple[LiveServer, Path]) -> None:
    """create shows the key once; the database keeps only its hash; list and show never show
    it; a revoked key fails at its next request, with no restart."""
    server, data = tenant_server
    out = npugate(server, "keys", "create", "cli-alice", "--rpm", "600", "--weight", "2")
    key = re.search(r"key: (npg-\S+)", out)
    assert key, out
    key_text = key.group(1)
    with sdk(server, key_text) as client:
        assert client.chat.completions.create(
            model=PHI3, max_tokens=2, messages=[{"role": "user", "content": "hi"}]).choices
    listed = npugate(server, "keys", "list")
    assert "cli-alice" in listed and "rpm=600" in listed and "weight=2" in listed
    assert key_text not in listed and key_text not in npugate(server, "keys", "show",
                                                             "cli-alice")
    db = sqlite3.connect(data / SQLITE_FILE)
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert "cli-alice" in dump and key_text not in dump  # hashed, never in clear
    assert "revoked" in npugate(server, "keys", "revoke", "cli-alice")
    with sdk(server, key_text, max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()
    # and the server now needs a key: it has keys in its database
    assert httpx.get(server.base_url + "/v1/models", timeout=10).status_code == 401


def test_the_admin_api_refuses_bad_requests(tenant_server: tuple[LiveServer, Path]) -> None:
    server, _ = tenant_server
    admin = {"Authorization": f"Bearer {ADMIN}"}
    url = server.base_url + "/v1/admin/keys"
    assert httpx.post(url, json={"name": "x"}, timeout=10).status_code == 401
    for body, param in (({}, "name"), ({"name": "bad name"}, "name"),
                        ({"name": "ok", "requests_per_minute": -1}, "requests_per_minute"),
                        ({"name": "ok", "models": []}, "models"),
                        ({"name": "ok", "colour": "red"}, "colour")):
        resp = httpx.post(url, json=body, headers=admin, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, body
    create(server, "twice")
    again = httpx.post(url, json={"name": "twice"}, headers=admin, timeout=10)
    assert again.status_code == 409
    assert httpx.delete(url + "/no-such-key", headers=admin, timeout=10).status_code == 404


def test_a_key_without_access_to_a_model_gets_403_naming_it(
        tenant_server: tuple[LiveServer, Path]) -> None:
    server, _ = tenant_server
    key = create(server, "embed-only", models=[EMBED])
    resp = chat(server, key)
    assert resp.status_code == 403
    error = resp.json()["error"]
    assert error["code"] == "model_not_allowed" and PHI3 in error["message"]
    with sdk(server, key) as client:
        assert [m.id for m in client.models.list()] == [EMBED]
        assert client.embeddings.create(model=EMBED, input="hi").data
    with anthropic.Anthropic(base_url=server.base_url, api_key=key) as claude, \
            pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(model=PHI3, max_tokens=2,
                               messages=[{"role": "user", "content": "hi"}])


def test_rate_limits_answer_429_with_openais_headers_and_the_sdk_retries(
        tenant_server: tuple[LiveServer, Path]) -> None:
    """Over its requests per minute a key gets 429 with Retry-After, retry-after-ms and the
    x-ratelimit-* headers; the official SDK waits that long and its retry succeeds."""
    server, _ = tenant_server
    key = create(server, "rpm-12", requests_per_minute=12)  # one comes back every 5 s
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as http:
        statuses = [http.get("/v1/models").status_code for _ in range(13)]
    assert statuses == [200] * 12 + [429]
    resp = http_get_limited(server, headers)
    error = resp.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "rpm-12" in error["message"]
    assert resp.headers["x-ratelimit-limit-requests"] == "12"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+(\.\d+)?s|\d+m\d+s", resp.headers["x-ratelimit-reset-requests"])
    wait_ms = int(resp.headers["retry-after-ms"])
    assert 1000 < wait_ms <= 5000 and int(resp.headers["retry-after"]) == -(-wait_ms // 1000)
    started = time.monotonic()
    with sdk(server, key, max_retries=2) as client:  # seconds before a request comes back
        raw = client.chat.completions.with_raw_response.create(
            model=PHI3, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices and raw.retries_taken >= 1  # it was limited, waited, retried
    assert time.monotonic() - started >= wait_ms / 1000 - 0.5


def http_get_limited(server: LiveServer, headers: dict[str, str]) -> httpx.Response:
    resp = httpx.get(server.base_url + "/v1/models", headers=headers, timeout=10)
    assert resp.status_code == 429
    return resp


def test_tokens_per_minute_count_what_was_used(tenant_server: tuple[LiveServer, Path]) -> None:
    server, _ = tenant_server
    key = create(server, "tpm-50", tokens_per_minute=50)
    first = chat(server, key, LONG, max_tokens=4)  # ~170 tokens: admitted, then charged
    assert first.status_code == 200
    assert first.headers.get("x-ratelimit-limit-tokens") is None  # only on a 429
    second = chat(server, key)
    assert second.status_code == 429
    assert second.headers["x-ratelimit-limit-tokens"] == "50"
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    used = first.json()["usage"]["total_tokens"]
    wait_s = int(second.headers["retry-after-ms"]) / 1000
    assert (used - 50) * 60 / 50 * 0.9 < wait_s < (used - 50 + 1) * 60 / 50 * 1.1


def endless(client: openai.OpenAI, phi3_dir: Path, tokens: int = 1000) -> Any:
    """A stream of exactly `tokens` tokens (the end-of-text tokens banned), already running."""
    eos = json.loads((phi3_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    stream = client.chat.completions.create(
        model=PHI3, max_tokens=tokens, stream=True, stream_options={"include_usage": True},
        logit_bias={str(t): -100 for t in (eos if isinstance(eos, list) else [eos])},
        messages=[{"role": "user", "content": "hi"}])
    first = next(iter(stream))
    assert first.choices
    return stream


def test_a_spent_quota_refuses_the_next_request_while_an_open_stream_finishes(
        tenant_server: tuple[LiveServer, Path], phi3_dir: Path) -> None:
    server, _ = tenant_server
    key = create(server, "quota-300", tokens_per_day=300)
    streaming = sdk(server, key, max_retries=0)
    stream = endless(streaming, phi3_dir)  # admitted while the quota had room
    spent = 0
    for _ in range(10):  # spend the day's tokens while the stream runs
        resp = chat(server, key, LONG, max_tokens=8)
        if resp.status_code == 429:
            break
        assert resp.status_code == 200
        spent += 1
    assert spent >= 1
    assert resp.status_code == 429 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["code"] == "insufficient_quota"
    assert 0 < int(resp.headers["retry-after"]) <= 86400
    chunks = list(stream)  # the open stream still runs to its end
    streaming.close()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 1000
    with sdk(server, key, max_retries=3) as client, \
            pytest.raises(openai.RateLimitError):  # the SDK does not retry a spent quota
        client.chat.completions.create(
            model=PHI3, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    usage = httpx.get(server.base_url + "/v1/admin/usage", params={"tenant": "quota-300"},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    totals = usage["totals"]["quota-300"]
    assert totals["requests"] == 1 + spent + 2 and totals["rate_limited"] == 2
    assert 1000 + spent <= totals["generated_tokens"] <= 1000 + 8 * spent  # what was used
    assert totals["prompt_tokens"] > 300


def test_a_concurrency_cap(tenant_server: tuple[LiveServer, Path], phi3_dir: Path) -> None:
    server, _ = tenant_server
    key = create(server, "one-at-a-time", max_concurrent=1)
    with sdk(server, key, max_retries=0) as client:
        stream = endless(client, phi3_dir)
        second = chat(server, key)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
        list(stream)
    assert chat(server, key).status_code == 200  # the slot is back when the stream ends


def test_two_tenants_never_see_each_others_caches_or_responses(
        tenant_server: tuple[LiveServer, Path]) -> None:
    server, _ = tenant_server
    a, b = create(server, "cache-a"), create(server, "cache-b")

    def cached(key: str) -> int:
        resp = chat(server, key, LONG, max_tokens=1)
        return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached(a) == 0 and cached(a) >= 128  # A hits its own prompt
    assert cached(b) == 0  # the same prompt, another tenant
    for key in (a, a, b):
        with sdk(server, key) as client:
            client.embeddings.create(model=EMBED, input="a secret sentence")
    metrics = httpx.get(server.base_url + "/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {a}"}).text
    assert _sample(metrics, "npugate_tenant_embedding_cache_lookups_total",
                   tenant="cache-a", result="hit") == 1
    assert _sample(metrics, "npugate_tenant_embedding_cache_lookups_total",
                   tenant="cache-b", result="miss") == 1
    assert _sample(metrics, "npugate_tenant_embedding_cache_lookups_total",
                   tenant="cache-b", result="hit") == 0
    assert _sample(metrics, "npugate_tenant_tokens_total", tenant="cache-a",
                   kind="cached") >= 128
    assert _sample(metrics, "npugate_tenant_tokens_total", tenant="cache-b", kind="cached") == 0
    with sdk(server, a) as mine, sdk(server, b) as theirs:
        stored = mine.responses.create(model=PHI3, input="hi", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(stored.id)
        assert mine.responses.retrieve(stored.id).id == stored.id


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1:line.index("}")]
            if sorted(got.split(",")) == sorted(want.split(",")):
                return float(line.split()[-1])
    return 0.0


def test_the_usage_command(tenant_server: tuple[LiveServer, Path]) -> None:
    server, _ = tenant_server
    key = create(server, "usage-bob")
    for _ in range(3):
        assert chat(server, key).status_code == 200
    out = npugate(server, "usage", "--key", "usage-bob")
    (row,) = [ln for ln in out.splitlines() if "usage-bob" in ln]
    assert row.split()[2] == "3"  # requests


def test_a_bucket_and_durations() -> None:
    bucket = Bucket(capacity=60, level=0, updated=0.0)
    assert bucket.wait_s() == 1.0
    bucket.refill(30.0)
    assert bucket.level == 30 and bucket.headers("requests") == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "30",
        "x-ratelimit-reset-requests": "30s"}
    assert [duration(s) for s in (0.0201, 1.5, 59.99, 360, 3723)] == [
        "21ms", "1.5s", "60s", "6m0s", "1h2m3s"]


@pytest.mark.anyio
async def test_the_gate_counts_running_generations_and_tokens() -> None:
    now = [0.0]
    gate = Gate(clock=lambda: now[0])
    tenant = Tenant("t", "s", limits=Limits(tokens_per_minute=600, max_concurrent=2))
    first, second = await gate.begin(tenant), await gate.begin(tenant)
    with pytest.raises(Exception, match="2 generations running"):
        await gate.begin(tenant)
    first.finish(prompt_tokens=500, generated_tokens=200)  # 700 of 600: below zero
    first.finish(prompt_tokens=500)  # a lease ends once
    second.finish()
    with pytest.raises(Exception, match="tokens: 600 per minute") as refused:
        await gate.begin(tenant)
    assert refused.value.retry_after_s == pytest.approx(10.1)  # (1 - -100) / 10 per second
    now[0] = 10.1
    (await gate.begin(tenant)).finish()
    assert not gate.running


def test_open_streams_and_revocation_over_the_websocket(
        tenant_server: tuple[LiveServer, Path]) -> None:
    """A socket authenticated with a database key: its next conversation after revocation
    is refused and the socket closes."""
    from websockets.sync.client import connect

    server, _ = tenant_server
    key = create(server, "socket-key")
    url = server.base_url.replace("http", "ws", 1) + "/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send(json.dumps({"type": "chat.create", "id": "1", "request": {
            "model": PHI3, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}}))
        while '"chat.done"' not in (message := str(ws.recv(timeout=30))):
            assert '"error"' not in message, message
        npugate(server, "keys", "revoke", "socket-key")
        ws.send(json.dumps({"type": "chat.create", "id": "2", "request": {
            "model": PHI3, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}}))
        refused = str(ws.recv(timeout=30))
        assert "invalid_api_key" in refused



@pytest.mark.anyio
async def test_a_database_key_while_the_database_is_away_gets_503(phi3: ChatModel,
                                                                   tmp_path: Path) -> None:
    """A database key cannot be checked without the database: 503, never a guess. Keys from
    the key file still work. (Its own data directory: a key in the shared one would close
    every later test's server.)"""
    settings = Settings(api_keys=("sk-file name=file",), data_dir=tmp_path)
    async with serving(settings, chat=[phi3]) as app:
        _, key = await app.extensions["npugate"].tenants.keys.create("db-key")
        http = app.test_client()
        body = {"model": PHI3, "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}
        ok = await http.post("/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        await app.extensions["npugate"].database.close()
        away = await http.post("/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"})
        assert away.status_code == 503 and "Retry-After" in away.headers
        assert (await away.get_json())["error"]["code"] == "database_unavailable"
        file_key = await http.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": "Bearer sk-file"})
        assert file_key.status_code == 200
