"""The micro-batcher's rule, with a deterministic fake model behind the same interface,
and once on the real model."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import numpy as np
import pytest

from inference.embed.batcher import EmbeddingBatcher
from inference.embed.model import EmbeddingModel
from inference.errors import Overloaded
from inference.limits import EmbeddingLimits

pytestmark = pytest.mark.anyio


@dataclass
class _Spec:
    model_id: str = "fake"
    max_length: int = 512


class FakeModel:
    """Vectors are [first id, length]; `gate` holds each run until the test releases it."""

    def __init__(self) -> None:
        self.spec = _Spec()
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        self.started.set()
        self.gate.wait(10)
        self.batches.append([list(x) for x in batch])
        return [np.array([x[0], len(x)], dtype=np.float32) for x in batch]


@pytest.fixture
async def fake() -> FakeModel:
    return FakeModel()


async def test_results_return_in_order_and_requests_share_runs(fake: FakeModel) -> None:
    batcher = EmbeddingBatcher(fake, EmbeddingLimits(max_batch_size=8, max_batch_tokens=1000))  # type: ignore[arg-type]
    results: dict[int, list[np.ndarray]] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        first = [[999] * 3]

        async def call(n: int, inputs: list[list[int]]) -> None:
            results[n] = await batcher.embed(inputs)

        tg.start_soon(call, -1, first)  # occupies the device while the others gather
        await anyio.to_thread.run_sync(fake.started.wait)
        for n in range(10):
            tg.start_soon(call, n, [[n, *([0] * n)], [100 + n]])
        await anyio.sleep(0.05)
        fake.gate.set()
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    for n in range(10):
        assert [v.tolist() for v in results[n]] == [[n, n + 1], [100 + n, 1]]
    assert len(fake.batches) < 11  # 20 inputs from 10 requests shared runs
    assert all(len(b) <= 8 for b in fake.batches)


async def _queued_behind_a_run(fake: FakeModel, batcher: EmbeddingBatcher,
                               lengths: list[int]) -> None:
    """One input runs (held at the gate) while inputs of `lengths` queue, in that order;
    then everything runs."""
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        tg.start_soon(batcher.embed, [[1]])
        await anyio.to_thread.run_sync(fake.started.wait)
        for i, n in enumerate(lengths):
            tg.start_soon(batcher.embed, [[i] * n])
            await anyio.sleep(0.001)
        fake.gate.set()
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()


async def test_token_budget_and_length_sorting(fake: FakeModel) -> None:
    batcher = EmbeddingBatcher(fake, EmbeddingLimits(max_batch_size=64, max_batch_tokens=600))  # type: ignore[arg-type]
    await _queued_behind_a_run(fake, batcher, [500, 10, 12, 11, 9, 300, 13])
    for batch in fake.batches:
        assert max(len(x) for x in batch) * len(batch) <= 600
    # the oldest (500 tokens) runs first, alone; the short ones run together
    assert [len(x) for x in fake.batches[1]] == [500]
    assert sorted(len(x) for x in fake.batches[2]) == [9, 10, 11, 12, 13]


async def test_a_neighbour_joins_only_when_its_padding_costs_less_than_a_run(
        fake: FakeModel) -> None:
    """The rule in batcher.py: a neighbour joins while the padding it brings is at most a
    run's fixed cost (16 padded tokens); counted in the batcher's stats."""
    limits = EmbeddingLimits(max_batch_size=64, max_batch_tokens=10_000)
    batcher = EmbeddingBatcher(fake, limits)  # type: ignore[arg-type]
    # 4 x 10 tokens, then 14 (brings 4 x 4 = 16 of padding: joins), then 30 (brings 5 x 16
    # = 80: runs apart)
    await _queued_behind_a_run(fake, batcher, [10, 10, 10, 10, 14, 30])
    assert sorted(len(x) for x in fake.batches[1]) == [10, 10, 10, 10, 14]
    assert [len(x) for x in fake.batches[2]] == [30]
    assert batcher.stats.padding_refusals_total == 1
    assert batcher.stats.queue_depth_total == 1 + 6 + 1  # at each of the three cuts


async def test_cancelled_request_costs_no_compute(fake: FakeModel) -> None:
    batcher = EmbeddingBatcher(fake)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        tg.start_soon(batcher.embed, [[1]])
        await anyio.to_thread.run_sync(fake.started.wait)
        with anyio.move_on_after(0.05):  # the caller gives up while queued
            await batcher.embed([[777, 777]])
        fake.gate.set()
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert all(x[0] != 777 for b in fake.batches for x in b)
    assert batcher.stats.cancelled_inputs_total == 1


async def test_full_queue_is_overloaded(fake: FakeModel) -> None:
    batcher = EmbeddingBatcher(fake, EmbeddingLimits(max_queued_inputs=4))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        tg.start_soon(batcher.embed, [[1]])
        await anyio.to_thread.run_sync(fake.started.wait)
        tg.start_soon(batcher.embed, [[2], [3], [4]])
        await anyio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.embed([[5], [6]])
        fake.gate.set()
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()


async def test_concurrent_requests_on_the_real_model(minilm: EmbeddingModel) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'}"
             for i in range(64)]
    ids = minilm.tokenize(texts)
    alone = [minilm.embed_batch([x])[0] for x in ids]
    batcher = EmbeddingBatcher(minilm)
    got: dict[int, np.ndarray] = {}

    async def call(i: int) -> None:
        got[i] = (await batcher.embed([ids[i]]))[0]

    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        async with anyio.create_task_group() as calls:
            for i in range(64):
                calls.start_soon(call, i)
        tg.cancel_scope.cancel()
    for i in range(64):
        np.testing.assert_allclose(got[i], alone[i], atol=1e-5)
    assert batcher.stats.model_runs_total < 64


async def test_a_flood_does_not_hold_back_another_tenants_input(fake: FakeModel) -> None:
    """Tenant A queues 40 inputs (five batches' worth) while the device is busy; tenant B's
    one input, queued after them, runs in the first batch cut after the busy one: its place
    is the head's plus one. First come, first served would run it sixth."""
    batcher = EmbeddingBatcher(fake, EmbeddingLimits(max_batch_size=8, max_batch_tokens=1000),  # type: ignore[arg-type]
                               run_cost_tokens=0)  # same lengths only: batches are by place
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        tg.start_soon(batcher.embed, [[1]], "a")
        await anyio.to_thread.run_sync(fake.started.wait)
        tg.start_soon(batcher.embed, [[2] * 4 for _ in range(40)], "a")
        await anyio.sleep(0.01)
        tg.start_soon(batcher.embed, [[3] * 4], "b")
        await anyio.sleep(0.01)
        fake.gate.set()
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    which = [i for i, batch in enumerate(fake.batches) if [3] * 4 in batch]
    assert which == [1], [len(b) for b in fake.batches]
    assert sum(len(b) for b in fake.batches) == 42


@pytest.mark.anyio
async def test_a_heavier_tenant_gets_more_of_each_batch(fake: FakeModel) -> None:
    """Tenants A (weight 1) and B (weight 2) each queue 16 inputs while the device is busy:
    B's inputs advance its place by half a step, so B gets most of the first batches (with
    equal weights A, queued first, would)."""
    batcher = EmbeddingBatcher(fake, EmbeddingLimits(max_batch_size=6, max_batch_tokens=1000),  # type: ignore[arg-type]
                               run_cost_tokens=0)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        fake.gate.clear()
        tg.start_soon(batcher.embed, [[1]], "a")
        await anyio.to_thread.run_sync(fake.started.wait)
        tg.start_soon(batcher.embed, [[2] * 4 for _ in range(16)], "a", 1.0)
        await anyio.sleep(0.01)
        tg.start_soon(batcher.embed, [[3] * 4 for _ in range(16)], "b", 2.0)
        await anyio.sleep(0.01)
        fake.gate.set()
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    first_two = [x for batch in fake.batches[1:3] for x in batch]
    assert sum(x == [3] * 4 for x in first_two) >= 7, [len(b) for b in fake.batches]
    last = {t: max(i for i, b in enumerate(fake.batches) if [t] * 4 in b) for t in (2, 3)}
    assert last[3] < last[2]  # B, twice the weight, is done first
