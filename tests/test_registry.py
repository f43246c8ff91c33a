"""The registry's memory accounting: what a loaded model holds, as the process sees it."""

from __future__ import annotations

import anyio
import pytest

from inference.chat.model import ChatModel
from inference.chat.sampling import SamplingParams
from server.core.registry import ModelEntry
from tests.conftest import chat_engine

pytestmark = pytest.mark.anyio


async def test_a_chat_model_counts_the_kv_it_wrote_not_the_buffer(phi3: ChatModel) -> None:
    # The attack run: one 300-token chat made a pool count as 720 MiB while the whole
    # process held 452 MiB, and a request to another model then unloaded two models.
    engine = chat_engine(phi3, kv_budget_bytes=512 * 2**20)
    entry = ModelEntry("m", "chat", None, status="ready", chat=engine, expected_bytes=10**6)
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        async with await engine.start([{"role": "user", "content": "hi " * 100}],
                                      SamplingParams(max_tokens=200)) as stream:
            async for _ in stream:
                pass
        usage = engine.kv_usage()
        tg.cancel_scope.cancel()
    assert usage["allocated_bytes"] >= 10 * usage["resident_bytes"] > 0
    assert entry.memory_bytes() == 10**6 + engine.kv_usage()["resident_bytes"]
