"""PostgreSQL as the response store that replicas share: a real server from Debian's package,
started by the test, two replicas behind the project's nginx config, and one conversation
whose turns land on both. Skips where PostgreSQL or nginx is absent, except in CI
(NPUGATE_REQUIRE_POSTGRES=1), where it fails."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from openai import NotFoundError, OpenAI

from server.core.database import PostgresDatabase
from server.responses.store import SCHEMA, ResponseStore, Retention, StoredResponse
from tests.conftest import LiveServer, free_port
from tests.test_nginx import nginx_in_front, require_nginx

ADMIN = "admin-key-for-replicas"
SMOL = "smollm2-135m-instruct"
BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _missing(what: str) -> None:
    if os.environ.get("NPUGATE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"no {what} (apt-get install postgresql nginx-light)")
    pytest.skip(f"no {what} (apt-get install postgresql nginx-light)")


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on a loopback port, in a fresh cluster: its URL."""
    if not BINARIES:
        _missing("PostgreSQL")
    bin_dir = Path(BINARIES[-1])
    # outside pytest's temporary folders, which only their owner may enter
    folder = Path(tempfile.mkdtemp(prefix="npugate-postgres-"))
    data, port = folder / "data", free_port()
    # PostgreSQL refuses to run as root: there it runs as the package's own user
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chmod(folder, 0o777)
        as_user = ["runuser", "-u", "postgres", "--"]
        data.mkdir()
        os.chown(data, user.pw_uid, user.pw_gid)
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "npugate", "--no-sync"], check=True, capture_output=True, timeout=120)
    log = (folder / "postgres.log").open("w")
    proc = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p",
                             str(port), "-h", "127.0.0.1", "-k", str(folder), "-c",
                             "fsync=off"], stdout=log, stderr=subprocess.STDOUT)
    url = f"postgresql://npugate@127.0.0.1:{port}/postgres"
    try:
        for _ in range(200):
            if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError((folder / "postgres.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_store_itself(postgres: str) -> None:
    """Owner scoping, delete, stats, and the size bound dropping the oldest first."""
    async def run() -> None:
        db = PostgresDatabase(postgres)
        await db.open(SCHEMA)
        store = ResponseStore(db, Retention(max_age_s=0, max_bytes=20_000))
        try:
            await store.put(StoredResponse("resp_x", "a", 1.0, {"id": "resp_x"}, []))
            assert (await store.get("resp_x", "a")) is not None
            assert (await store.get("resp_x", "b")) is None
            assert not await store.delete("resp_x", "b")
            assert await store.delete("resp_x", "a")
            for i in range(130):
                await store.put(StoredResponse(f"resp_{i:03d}", "k", 10.0 + i,
                                               {"n": "x" * 400}, []))
            stats = await store.stats()
            assert stats["kind"] == "postgresql" and stats["reachable"]
            assert stats["url"] == postgres  # no password to hide here
            assert await store.get("resp_000", "k") is None
            assert await store.get("resp_129", "k") is not None
        finally:
            await db.close()

    anyio.run(run)


@pytest.fixture(scope="module")
def shared_replicas(postgres: str, smollm2_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[tuple[str, list[LiveServer]]]:
    require_nginx("NPUGATE_REQUIRE_POSTGRES")
    prefix = tmp_path_factory.mktemp("nginx-pg")
    (prefix / "admin").write_text(ADMIN + "\n")
    replicas = [LiveServer(chat=[smollm2_dir], embedding=[], log=prefix / f"replica{i}.log",
                           extra=["--response-store", postgres, "--api-key", "sk-a",
                                  "--api-key", "sk-b", "--admin-key-file",
                                  str(prefix / "admin")])
                for i in range(2)]
    try:
        with nginx_in_front(replicas, prefix) as base:
            yield base, replicas
    finally:
        for r in replicas:
            r.stop()


def _served(replica: LiveServer) -> int:
    (entry,) = replica.health()["models"]
    return int(entry["stats"]["requests_total"])


def test_a_conversation_across_replicas(shared_replicas: tuple[str, list[LiveServer]]
                                        ) -> None:
    """Four turns through nginx, each continuing the last by previous_response_id: both
    replicas serve turns, each reads the others' responses from the shared store, and
    another key sees none of them."""
    base, replicas = shared_replicas
    before = [_served(r) for r in replicas]
    sdk = OpenAI(base_url=base + "/v1", api_key="sk-a", max_retries=0)
    previous, asked = None, []
    for question in ("Tell me about Paris.", "And its museums?", "And its food?",
                     "And its parks?"):
        turn = sdk.responses.create(model=SMOL, input=question, previous_response_id=previous,
                                    max_output_tokens=12)
        asked.append(question)
        previous = turn.id
    served = [_served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 4 and min(served) >= 1, served
    assert previous is not None
    items = sdk.responses.input_items.list(previous, order="asc", limit=100)
    users = [i.content[0].text for i in items.data if i.role == "user"]  # type: ignore[union-attr]
    assert users == asked
    for replica in replicas:  # each replica reads the last turn, wherever it ran
        direct = OpenAI(base_url=replica.base_url + "/v1", api_key="sk-a", max_retries=0)
        assert direct.responses.retrieve(previous).id == previous
        with pytest.raises(NotFoundError):
            OpenAI(base_url=replica.base_url + "/v1", api_key="sk-b",
                   max_retries=0).responses.retrieve(previous)
    store = replicas[0].health()["response_store"]
    assert store["kind"] == "postgresql" and store["reachable"] and store["entries"] >= 4


def test_an_unreachable_store_is_reported(smollm2_dir: Path, tmp_path: Path) -> None:
    """A server whose PostgreSQL is down does not start serving responses as if stored: it
    says why at start-up."""
    url = f"postgresql://npugate@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(RuntimeError, match="cannot open the database .--response-store."):
        LiveServer(chat=[smollm2_dir], embedding=[], log=tmp_path / "server.log",
                   extra=["--response-store", url])


def test_keys_revocations_and_quotas_hold_on_every_replica(
        shared_replicas: tuple[str, list[LiveServer]]) -> None:
    """A key made on one replica works on the other; tokens used on one count against the
    quota on the other; a revocation on one stops the key on both at its next request."""
    _, (one, two) = shared_replicas
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = httpx.post(one.base_url + "/v1/admin/keys", headers=admin, timeout=10,
                      json={"name": "everywhere", "tokens_per_day": 20})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    body = {"model": SMOL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Tell me about Paris, in detail."}]}
    headers = {"Authorization": f"Bearer {key}"}
    used = httpx.post(two.base_url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=60)
    assert used.status_code == 200 and used.json()["usage"]["total_tokens"] >= 20
    time.sleep(2.5)  # replica two writes its usage within a second
    refused = httpx.post(one.base_url + "/v1/chat/completions", json=body, headers=headers,
                         timeout=60)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    listed = httpx.get(one.base_url + "/v1/admin/usage", headers=admin, timeout=10,
                       params={"tenant": "everywhere"}).json()
    assert listed["totals"]["everywhere"]["requests"] == 2
    assert httpx.delete(two.base_url + "/v1/admin/keys/everywhere", headers=admin,
                        timeout=10).status_code == 200
    for replica in (one, two):
        assert httpx.get(replica.base_url + "/v1/models", headers=headers,
                         timeout=10).status_code == 401
