"""GET /metrics after real traffic on the fixture models."""

from __future__ import annotations

import re

import pytest
from quart import Quart

pytestmark = pytest.mark.anyio
CHAT = "phi3-tiny-random"
HELLO = [{"role": "user", "content": "hello"}]




def _value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(m.group(2).split(",")))
            if got == want:
                return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not in metrics")


async def test_metrics_cover_chat_and_embeddings(app: Quart) -> None:
    client = app.test_client()
    await client.post("/v1/chat/completions", json={"model": CHAT, "messages": HELLO,
                                                    "max_tokens": 5, "stream": True})
    await client.post("/v1/chat/completions", json={"model": CHAT, "messages": HELLO,
                                                    "max_tokens": 3})
    await client.post("/v1/embeddings", json={"model": "bert-tiny-cls-random",
                                              "input": ["a", "b", "c"]})
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    text = (await resp.get_data()).decode()
    assert _value(text, "npugate_time_to_first_token_seconds_count", model=CHAT) == 2
    assert _value(text, "npugate_inter_token_latency_seconds_count", model=CHAT) == 4 + 2
    assert _value(text, "npugate_e2e_request_latency_seconds_count", model=CHAT,
                  endpoint="sse") == 1
    assert _value(text, "npugate_e2e_request_latency_seconds_count", model=CHAT,
                  endpoint="chat") == 1
    assert _value(text, "npugate_request_queue_time_seconds_count", model=CHAT) == 2
    assert _value(text, "npugate_generation_tokens_total", model=CHAT) == 8
    assert _value(text, "npugate_prompt_tokens_total", model=CHAT) > 0
    assert _value(text, "npugate_num_requests_running", model=CHAT) == 0
    assert _value(text, "npugate_chat_requests_total", model=CHAT, outcome="completed") == 2
    # model runs, not deliveries: each request is one prefill run, then a decode run per
    # token after the first (the two ran one after the other, so no run stepped both)
    assert _value(text, "npugate_model_runs_total", model=CHAT,
                  provider="CPUExecutionProvider") == 2 + 4 + 2
    assert _value(text, "npugate_decode_batch_size_count", model=CHAT) == 6
    assert _value(text, "npugate_decode_batch_size_sum", model=CHAT) == 6
    assert _value(text, "npugate_prefill_chunk_tokens_count", model=CHAT) == 2
    assert _value(text, "npugate_chat_model_run_seconds_count", model=CHAT, kind="decode") == 6
    assert _value(text, "npugate_kv_cache_bytes", model=CHAT, kind="budget") == 2**31
    assert _value(text, "npugate_kv_cache_bytes", model=CHAT, kind="reserved") == 0
    assert _value(text, "npugate_kv_cache_rows", model=CHAT, kind="in_use") == 0
    # two short prompts: looked up, nothing to reuse (under one prefill chunk)
    assert _value(text, "npugate_prompt_cache_misses_total", model=CHAT) == 2
    assert _value(text, "npugate_prompt_cache_hits_total", model=CHAT) == 0
    assert _value(text, "npugate_prompt_cache_entries", model=CHAT) == 0
    emb = "bert-tiny-cls-random"
    assert _value(text, "npugate_embedding_inputs_total", model=emb) == 3
    assert _value(text, "npugate_embedding_batch_size_sum", model=emb) == 3
    assert _value(text, "npugate_embedding_batch_tokens_count", model=emb) >= 1
    assert _value(text, "npugate_model_runs_total", model=emb,
                  provider="CPUExecutionProvider") >= 1
    assert _value(text, "npugate_cpu_fallback", model=emb) == 0
    assert _value(text, "npugate_model_ready", model=emb, task="embedding") == 1


async def test_decode_batches_and_kv_use_while_streams_run(app: Quart) -> None:
    import anyio

    client = app.test_client()
    seen: dict[str, float] = {}

    async def chat() -> None:
        await client.post("/v1/chat/completions", json={
            "model": CHAT, "messages": HELLO, "max_tokens": 600, "temperature": 0})

    async def watch() -> None:
        for _ in range(200):
            text = (await (await client.get("/metrics")).get_data()).decode()
            rows = _value(text, "npugate_kv_cache_rows", model=CHAT, kind="in_use")
            allocated = _value(text, "npugate_kv_cache_bytes", model=CHAT, kind="allocated")
            # rows are taken at admission; the buffer is shaped at the next device round
            if rows == 3 and allocated > 0:
                seen["reserved"] = _value(text, "npugate_kv_cache_bytes", model=CHAT,
                                          kind="reserved")
                seen["allocated"] = allocated
                health = await (await client.get("/health")).get_json()
                seen["health_rows"] = health["models"][0]["kv_cache"]["rows_in_use"]
                return
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(chat)
        tg.start_soon(watch)
    assert seen["reserved"] > 0 and 0 < seen["allocated"] <= 2**31
    assert seen["health_rows"] == 3
    text = (await (await client.get("/metrics")).get_data()).decode()
    runs = _value(text, "npugate_decode_batch_size_count", model=CHAT)
    stepped = _value(text, "npugate_decode_batch_size_sum", model=CHAT)
    assert stepped == 3 * 599 and runs < stepped  # three streams shared decode runs


TENANTS = {"api_keys": ("sk-a name=alice", "sk-b scope=team", "sk-c scope=team", "sk-d")}


@pytest.mark.app(settings=TENANTS)
async def test_usage_by_tenant(app: Quart) -> None:
    """Requests and tokens by tenant, named by the key list (never by a key or its hash):
    a key's name=, a shared scope's NAME, else key-N; failed keys apart."""
    client = app.test_client()

    async def chat(key: str) -> int:
        resp = await client.post("/v1/chat/completions", headers={
            "Authorization": f"Bearer {key}"}, json={"model": CHAT, "messages": HELLO,
                                                     "max_tokens": 3, "temperature": 0})
        body = await resp.get_json()
        return int(body["usage"]["completion_tokens"]) if resp.status_code == 200 else -1

    generated = {"alice": await chat("sk-a"),
                 "team": await chat("sk-b") + await chat("sk-c"),
                 "key-4": await chat("sk-d")}
    assert await chat("sk-wrong") == -1
    text = (await (await client.get("/metrics", headers={
        "Authorization": "Bearer sk-a"})).get_data()).decode()
    assert _value(text, "npugate_tenant_requests_total", tenant="alice", outcome="2xx") == 1
    assert _value(text, "npugate_tenant_requests_total", tenant="team", outcome="2xx") == 2
    assert _value(text, "npugate_tenant_requests_total", tenant="key-4", outcome="2xx") == 1
    assert _value(text, "npugate_tenant_requests_total", tenant="unauthenticated",
                  outcome="4xx") == 1
    for tenant, tokens in generated.items():
        assert _value(text, "npugate_tenant_tokens_total", tenant=tenant,
                      kind="generated") == tokens
        assert _value(text, "npugate_tenant_tokens_total", tenant=tenant, kind="prompt") > 0
    assert "sk-" not in text
