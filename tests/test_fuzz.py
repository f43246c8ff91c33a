"""Property-based fuzzing of every operation in /openapi.json against a live server:
generated, schema-guided and malformed input must never produce a 5xx, and every 4xx must
carry the OpenAI error body."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LiveServer

CHAT = "phi3-tiny-random"
EMB = "bert-tiny-cls-random"
EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
VALID = {
    "/v1/chat/completions": {"model": CHAT, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]},
    "/v1/embeddings": {"model": EMB, "input": "hello"},
    "/v1/completions": {"model": CHAT, "max_tokens": 4, "prompt": "hi"},
    "/v1/responses": {"model": CHAT, "max_output_tokens": 4, "input": "hi"},
    "/v1/responses/input_tokens": {"model": CHAT, "input": [{"role": "user", "content": "hi"}]},
    "/v1/messages": {"model": CHAT, "max_tokens": 4, "messages": [{"role": "user",
                                                                   "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": CHAT, "messages": [{"role": "user",
                                                               "content": [{"type": "text",
                                                                            "text": "hi"}]}]},
}


@pytest.fixture(scope="module")
def live_server(phi3_dir: Path, bert_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LiveServer]:
    server = LiveServer(chat=[phi3_dir], embedding=[bert_tiny_dir],
                        log=tmp_path_factory.mktemp("fuzz") / "server.log",
                        extra=["--max-tokens-limit", "8"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_pid(live_server: LiveServer) -> int:
    return live_server.proc.pid


@pytest.fixture(scope="module")
def live(live_server: LiveServer) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    client = httpx.Client(base_url=live_server.base_url, timeout=60)
    try:
        yield client, client.get("/openapi.json").json()
    finally:
        client.close()


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        body = resp.json()
        error = body["error"]
        if resp.request.url.path.startswith("/v1/messages"):  # Anthropic's shape there
            assert body["type"] == "error" and set(error) == {"type", "message"}
        else:
            assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]


def _post(client: httpx.Client, path: str, body: bytes) -> None:
    _check(client.post(path, content=body, headers={"Content-Type": "application/json"}))


def _properties(doc: dict[str, Any], path: str) -> list[str]:
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    return sorted(schema["properties"])


def test_document_lists_every_route(live: tuple[httpx.Client, dict[str, Any]]) -> None:
    _, doc = live
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
            "/health", "/metrics"} <= set(doc["paths"])
    assert "messages" in _properties(doc, "/v1/chat/completions")


@pytest.mark.parametrize("path", sorted(VALID))
@EXAMPLES
@given(body=st.binary(max_size=300))
def test_raw_bytes(live: tuple[httpx.Client, dict[str, Any]], path: str, body: bytes) -> None:
    _post(live[0], path, body)


@pytest.mark.parametrize("path", sorted(VALID))
@EXAMPLES
@given(value=json_values)
def test_arbitrary_json(live: tuple[httpx.Client, dict[str, Any]], path: str,
                        value: Any) -> None:
    _post(live[0], path, json.dumps(value).encode())


@pytest.mark.parametrize("path", sorted(VALID))
@EXAMPLES
@given(data=st.data())
def test_schema_guided_bodies(live: tuple[httpx.Client, dict[str, Any]], path: str,
                              data: st.DataObject) -> None:
    client, doc = live
    fields = _properties(doc, path)
    body = data.draw(st.dictionaries(st.sampled_from(fields), json_values, max_size=len(fields)))
    _post(client, path, json.dumps(body).encode())


@pytest.mark.parametrize("path", sorted(VALID))
@EXAMPLES
@given(data=st.data())
def test_valid_bodies_with_mutations(live: tuple[httpx.Client, dict[str, Any]], path: str,
                                     data: st.DataObject) -> None:
    client, doc = live
    changed = _mutations(data, doc, path, json_values, keep=())
    _post(client, path, json.dumps({**VALID[path], **changed}).encode())


def _mutations(data: st.DataObject, doc: dict[str, Any], path: str,
               values: st.SearchStrategy[Any], keep: tuple[str, ...]) -> dict[str, Any]:
    """New values, drawn from `values`, for 1-4 of the operation's fields (not `keep`)."""
    fields = data.draw(st.lists(st.sampled_from(_properties(doc, path)), min_size=1,
                                max_size=4, unique=True))
    return {field: data.draw(values) for field in fields if field not in keep}


NUMERIC_EDGES = st.sampled_from([
    None, 0, -0.0, 1e-310, 5e-324, -1e-310, 1e-9, 0.5, 1, 2, 2.0000001, -2, 100, 101, -100,
    1e308, -1e308, 2**31, 2**63, -(2**63), 2**70])


@pytest.mark.parametrize("path", sorted(VALID))
@EXAMPLES
@given(data=st.data())
def test_explicit_nulls_and_numeric_edges(live: tuple[httpx.Client, dict[str, Any]], path: str,
                                          data: st.DataObject) -> None:
    # clients that serialise unset fields send null; 1e-310 is a valid temperature
    client, doc = live
    required = ("max_tokens",) if path == "/v1/messages" else ()  # Anthropic requires it
    changed = _mutations(data, doc, path, NUMERIC_EDGES,
                         keep=("model", "messages", "input", "prompt", *required))
    if data.draw(st.booleans()):
        changed["logit_bias"] = {str(data.draw(st.integers(0, 40000))):
                                 data.draw(NUMERIC_EDGES)}
    resp = client.post(path, content=json.dumps({**VALID[path], **changed}).encode(),
                       headers={"Content-Type": "application/json"})
    _check(resp)
    if all(v is None for v in changed.values()):
        assert resp.status_code == 200, resp.text[:300]  # null means unset


@EXAMPLES
@given(model_id=st.text(min_size=1, max_size=40))
def test_model_lookup(live: tuple[httpx.Client, dict[str, Any]], model_id: str) -> None:
    client, _ = live
    _check(client.get("/v1/models/" + quote(model_id, safe="")))


@EXAMPLES
@given(model_id=st.text(min_size=1, max_size=40), verb=st.sampled_from(["load", "unload"]))
def test_admin_lookup(live: tuple[httpx.Client, dict[str, Any]], model_id: str,
                      verb: str) -> None:
    client, _ = live
    _check(client.post(f"/v1/admin/models/{quote(model_id, safe='')}/{verb}"))


def _nest(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema, "b": {"type": "integer"}}}
    return schema


hostile_schemas = st.one_of(
    st.integers(0, 3000).map(lambda n: {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(n)}}),
    st.integers(1, 60).map(_nest),
    st.integers(1, 3000).map(lambda n: {"enum": [f"value-{i}" for i in range(n)]}),
    st.integers(1, 200).map(lambda n: {"anyOf": [
        {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
        for i in range(n)]}),
    st.tuples(st.integers(-(2**80), 2**80), st.integers(0, 10)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.sampled_from([{"$ref": "#"}, {"type": "object", "properties": {"x": {"$ref": "#"}},
                                     "required": ["x"]},
                     {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
                     {"type": "object", "properties": {"a": {}}, "required": [{}, [], "a"]}]),
    st.sampled_from(["^(a|aa)*$", "^(a{1,50}){1,50}$", "^[a-z]{1000}$", "^(.*a){20}$",
                     "^((a+)+)+b$"]).map(lambda p: {"type": "string", "pattern": p}),
)


def _cpu_seconds(pid: int) -> float:
    """The server process's user + system CPU time, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=hostile_schemas, n=st.integers(1, 8))
def test_hostile_schemas_cost_bounded_cpu(live: tuple[httpx.Client, dict[str, Any]],
                                          live_pid: int, schema: dict[str, Any], n: int) -> None:
    client, _ = live
    body = {**VALID["/v1/chat/completions"], "n": n, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    before = _cpu_seconds(live_pid)
    _check(client.post("/v1/chat/completions", json=body))
    # measured, not timed: what the request cost the server, compile and decode included
    assert _cpu_seconds(live_pid) - before < 3.0, schema
