"""The prompt cache: multi-turn answers identical with and without it, hits on whole chunks,
eviction within the budget, prefixes shared by concurrent requests, cancelled requests."""

from __future__ import annotations

import anyio
import pytest

from inference.chat.engine import ChatEngine
from inference.chat.model import ChatModel
from inference.chat.prompt_cache import PromptCache
from inference.chat.sampling import SamplingParams
from tests.conftest import chat_engine, running

pytestmark = pytest.mark.anyio
GREEDY = SamplingParams(temperature=0, max_tokens=40)
QUESTIONS = ["Tell me about lighthouses.", "Why are they so tall?", "Who keeps them?",
             "What happens in storms?", "Name a famous one.", "How old is it?"]


async def _ask(engine: ChatEngine, messages: list[dict[str, str]],
               params: SamplingParams = GREEDY) -> tuple[str, int]:
    async with await engine.start(messages, params) as stream:
        deltas = [d async for d in stream]
    return "".join(d.text for d in deltas), deltas[-1].cached_tokens


async def _conversation(engine: ChatEngine, opening: str = "") -> tuple[list[str], list[int]]:
    messages: list[dict[str, str]] = []
    answers, cached = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": opening + question})
        answer, hit = await _ask(engine, list(messages))
        answers.append(answer)
        cached.append(hit)
        messages.append({"role": "assistant", "content": answer})
    return answers, cached


async def _conversation_into(out: dict[str, tuple[list[str], list[int]]], name: str,
                             engine: ChatEngine) -> None:
    out[name] = await _conversation(engine, f"[{name}] ")


async def _ask_into(out: dict[str, tuple[str, int]], key: str, engine: ChatEngine,
                    messages: list[dict[str, str]]) -> None:
    out[key] = await _ask(engine, messages)


async def _idle(engine: ChatEngine) -> None:
    with anyio.fail_after(5):
        while not engine.idle or engine.pool.in_use:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    await anyio.sleep(0.05)  # the round after the last token keeps the entry


def test_lookup_reuses_whole_chunks_and_leaves_one_token() -> None:
    cache = PromptCache(chunk=4)
    cache.add(list(range(10)), row=3)
    entry, usable = cache.lookup(list(range(12)))
    assert entry is not None and entry.row == 3 and usable == 8  # 10 shared -> 8
    assert cache.lookup(list(range(9)))[1] == 8  # one token must stay to run
    assert cache.lookup(list(range(8)))[1] == 4
    assert cache.lookup([0, 1, 2, 9, 9, 9])[1] == 0  # under a chunk: not worth it
    cache.add(list(range(20)), row=5)  # a longer prompt makes its own prefix redundant
    assert [e.row for e in cache.entries] == [5]
    assert cache.keepable(list(range(11)), written=11) == list(range(8))
    assert cache.keepable(list(range(11)), written=6) == list(range(4))  # cancelled early


@pytest.mark.parametrize("model_name", ["smollm2", "phi3"])
async def test_multi_turn_answers_are_identical_with_and_without(
        model_name: str, request: pytest.FixtureRequest) -> None:
    model: ChatModel = request.getfixturevalue(model_name)
    runs = {}
    for enabled in (False, True):
        async with running(chat_engine(model, prompt_cache=enabled)) as engine:
            runs[enabled] = await _conversation(engine)
            stats = engine.cache_stats()
    assert runs[True][0] == runs[False][0]  # token for token
    assert runs[False][1] == [0] * len(QUESTIONS)
    hits = runs[True][1]
    assert all(h % 64 == 0 for h in hits) and hits[-1] >= 256  # later turns reuse most
    assert hits == sorted(hits)
    assert stats["hits"] >= 3 and stats["tokens_reused"] == sum(hits)


async def test_interleaved_conversations_each_hit_their_own(phi3: ChatModel) -> None:
    async with running(chat_engine(phi3, max_running=4)) as engine:
        alone = [await _conversation(engine, f"[{name}] ") for name in "ab"]
    async with running(chat_engine(phi3, max_running=4)) as engine:
        together: dict[str, tuple[list[str], list[int]]] = {}
        async with anyio.create_task_group() as tg:
            for name in "ab":
                tg.start_soon(_conversation_into, together, name, engine)
    for i, name in enumerate("ab"):
        assert together[name][0] == alone[i][0]
        assert together[name][1][-1] >= 256


async def test_eviction_under_a_small_budget(phi3: ChatModel) -> None:
    # room for the running row and two kept prefixes of ~one chunk each
    per_token = phi3.kv_layout().bytes_per_token
    async with running(chat_engine(phi3, max_running=1,
                                   kv_budget_bytes=3 * 256 * per_token)) as engine:
        prompts = [[{"role": "user", "content": f"{word} " * 90}]
                   for word in ("red", "green", "blue", "gold")]
        for messages in prompts:
            await _ask(engine, messages, SamplingParams(temperature=0, max_tokens=4))
            await _idle(engine)
        stats = engine.cache_stats()
        assert stats["evictions"] >= 1 and stats["entries"] <= 2
        assert engine.pool.allocated_bytes <= engine.pool.budget_bytes
        # the newest prompt is still kept; the oldest was evicted
        assert (await _ask(engine, prompts[-1], SamplingParams(temperature=0, max_tokens=4)))[1]
        assert not (await _ask(engine, prompts[0], SamplingParams(temperature=0,
                                                                  max_tokens=4)))[1]


async def test_concurrent_requests_share_a_prefix(smollm2: ChatModel) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    questions = ["What is a lighthouse?", "What is a harbour?", "What is a ship?"]
    async with running(chat_engine(smollm2, prompt_cache=False)) as engine:
        expected = [(await _ask(engine, [system, {"role": "user", "content": q}]))[0]
                    for q in questions]
    async with running(chat_engine(smollm2)) as engine:
        await _ask(engine, [system, {"role": "user", "content": "hello"}])  # fills the cache
        await _idle(engine)
        results: dict[str, tuple[str, int]] = {}
        async with anyio.create_task_group() as tg:
            for question in questions:
                tg.start_soon(_ask_into, results, question, engine,
                              [system, {"role": "user", "content": question}])
    assert [results[q][0] for q in questions] == expected
    assert all(results[q][1] >= 128 for q in questions)  # every one of them hit


async def test_a_cancelled_request_leaves_a_usable_entry(smollm2: ChatModel) -> None:
    long = [{"role": "user", "content": "Summarise the following. " + "The sea is calm. " * 150}]
    async with running(chat_engine(smollm2, prompt_cache=False)) as engine:
        expected, _ = await _ask(engine, long)
    # 64-token chunks alone too, so the client can leave after 3 of the prompt's 11 or so
    async with running(chat_engine(smollm2, prefill_chunk_idle=64)) as engine:
        stream = await engine.start(long, SamplingParams(temperature=0, max_tokens=40))
        with anyio.fail_after(10):
            while engine.stats.prefill_runs_total < 3:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        stream.close()  # the client leaves mid-prefill
        await _idle(engine)
        assert engine.cache_stats()["entries"] == 1
        answer, hit = await _ask(engine, long)
        assert hit >= 128 and answer == expected


def test_entries_stay_within_their_byte_cap() -> None:
    cache = PromptCache(chunk=4, max_tokens=20)
    cache.add(list(range(8)), row=2)
    cache.add(list(range(100, 108)), row=3)
    cache.add(list(range(200, 212)), row=4)  # 28 tokens held: the oldest goes
    assert [e.row for e in cache.entries] == [3, 4]
    assert cache.stats.tokens_held == 20 and cache.stats.evictions == 1


async def test_a_small_cap_keeps_the_pool_s_memory_small(phi3: ChatModel) -> None:
    per_token = phi3.kv_layout().bytes_per_token
    async with running(chat_engine(phi3, prompt_cache_bytes=200 * per_token)) as engine:
        footprint = 0
        for i in range(4):  # distinct 150-token prompts: each leaves a 128-token entry
            await _ask(engine, [{"role": "user", "content": f"{i} " + "lighthouse " * 70}])
            await _idle(engine)
            footprint = footprint or engine.pool.resident_bytes()  # one entry's pages
        assert engine.cache.stats.tokens_held <= 200 and engine.cache.stats.evictions >= 2
        # the pool holds one entry's pages, not one per prompt seen (4x before)
        assert len(engine.cache.entries) == 1
        assert engine.pool.resident_bytes() <= 1.5 * footprint
