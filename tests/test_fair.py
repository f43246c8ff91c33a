"""Admission between tenants: each tenant's oldest waiting request in turn, so one tenant's
flood does not hold another's single request back (inference/fair.py)."""

from __future__ import annotations

import time

import anyio
import pytest

from inference.chat.engine import ChatEngine
from inference.chat.model import ChatModel
from inference.chat.sampling import SamplingParams
from inference.fair import FairQueue
from tests.conftest import chat_engine, running


def test_tenants_take_turns() -> None:
    queue: FairQueue[tuple[str, int]] = FairQueue(lambda item: item[0])
    for i in range(4):
        queue.append(("a", i))
    queue.append(("b", 0))
    queue.append(("c", 0))
    queue.append(("b", 1))
    taken = [queue.pop() for _ in range(len(queue))]
    assert taken == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert not queue and queue.tenants() == 0


def test_a_dropped_item_keeps_the_turn() -> None:
    queue: FairQueue[tuple[str, int]] = FairQueue(lambda item: item[0])
    for item in (("a", 0), ("a", 1), ("b", 0)):
        queue.append(item)
    assert queue.drop() == ("a", 0)  # cancelled: a's turn is not spent
    assert [queue.pop() for _ in range(2)] == [("a", 1), ("b", 0)]


def test_a_heavier_tenant_takes_more_turns() -> None:
    """Weight 2 takes two turns to weight 1's one; a tenant arriving late starts at the
    current turn, with no credit banked from while it was idle."""
    queue: FairQueue[tuple[str, int]] = FairQueue(lambda item: item[0],
                                                  lambda item: 2.0 if item[0] == "a" else 1.0)
    for i in range(6):
        queue.append(("a", i))
        queue.append(("b", i))
    taken = "".join(queue.pop()[0] for _ in range(6))
    assert taken == "abaaba", taken
    queue.append(("c", 0))  # within a round: at most two of a's and one of b's first
    assert ("c", 0) in [queue.pop() for _ in range(4)]


@pytest.mark.anyio
async def test_a_flood_does_not_hold_back_another_tenants_request(phi3: ChatModel) -> None:
    """Tenant A fills both rows and queues six more; B's one request, sent last, is admitted
    at the first free row, ahead of A's queue (first come, first served put it last)."""
    engine = chat_engine(phi3, max_running=2, max_waiting=16, prompt_cache=False)
    params = SamplingParams(temperature=0, max_tokens=24)
    hello = [{"role": "user", "content": "hello"}]
    order: list[str] = []

    async def run(name: str, scope: str) -> None:
        async with await engine.start(hello, params, cache_scope=scope) as stream:
            async for _ in stream:
                if name not in order:
                    order.append(name)

    async with running(engine), anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(run, f"a{i}", "tenant-a")
        while engine.running < 2:  # noqa: ASYNC110
            await anyio.sleep(0.001)
        tg.start_soon(run, "b", "tenant-b")
    assert order.index("b") <= 3, order  # after the two running, at the first free row


@pytest.mark.anyio
async def test_rows_are_kept_for_an_active_tenant(smollm2: ChatModel) -> None:
    """A lone tenant takes every row. Once B has sent work, A may hold all rows but one, so
    B's next request starts at once instead of after A's streams end."""
    engine = chat_engine(smollm2, max_running=3, max_waiting=16, prompt_cache=False)
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    long, short = SamplingParams(temperature=0, max_tokens=300), \
        SamplingParams(temperature=0, max_tokens=2)

    async def drain(scope: str, params: SamplingParams) -> None:
        async with await engine.start(story, params, cache_scope=scope) as stream:
            async for _ in stream:
                pass

    async with running(engine), anyio.create_task_group() as tg:
        await drain("tenant-b", short)  # B is active from now on
        for _ in range(4):
            tg.start_soon(drain, "tenant-a", long)
        while engine.running < 2 or engine.waiting < 2:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        await anyio.sleep(0.3)
        assert engine.running == 2  # the third row is kept for B
        started = time.monotonic()
        await drain("tenant-b", short)
        assert time.monotonic() - started < 2.0  # A's stories take many seconds
        tg.cancel_scope.cancel()

    lone = chat_engine(smollm2, max_running=3, max_waiting=16, prompt_cache=False)
    async with running(lone), anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(lambda: _drain_on(lone, story, long))
        while lone.running < 3:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        assert lone.running == 3  # a lone tenant uses every row
        tg.cancel_scope.cancel()


async def _drain_on(engine: ChatEngine, messages: list[dict[str, str]],
                    params: SamplingParams) -> None:
    async with await engine.start(messages, params, cache_scope="tenant-a") as stream:
        async for _ in stream:
            pass
