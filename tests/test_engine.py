from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from inference.chat.engine import ChatDelta, ChatEngine
from inference.chat.model import ChatModel
from inference.chat.sampling import SamplingParams
from inference.errors import BackendUnavailable, ContextTooLong, Overloaded

pytestmark = pytest.mark.anyio
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def _engine(model: ChatModel, **kw: int) -> AsyncIterator[ChatEngine]:
    engine = ChatEngine(model, **kw)
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        yield engine
        tg.cancel_scope.cancel()


@pytest.fixture
async def smol_engine(smollm2: ChatModel) -> AsyncIterator[ChatEngine]:
    async for e in _engine(smollm2):
        yield e


@pytest.fixture
async def phi3_engine(phi3: ChatModel) -> AsyncIterator[ChatEngine]:
    async for e in _engine(phi3, max_running=2, max_waiting=2):
        yield e


async def _collect(engine: ChatEngine, messages: list[dict[str, str]],
                   params: SamplingParams) -> list[ChatDelta]:
    async with await engine.start(messages, params) as stream:
        return [d async for d in stream]


async def test_greedy_smollm2_knows_paris(smol_engine: ChatEngine) -> None:
    deltas = await _collect(smol_engine, FRANCE, SamplingParams(temperature=0, max_tokens=24))
    text = "".join(d.text for d in deltas)
    assert "Paris" in text
    assert deltas[-1].finish_reason in ("stop", "length")
    assert deltas[-1].completion_tokens == len(deltas) <= 24


async def test_phi3_layout_fixture_generates(phi3_engine: ChatEngine) -> None:
    deltas = await _collect(phi3_engine, [{"role": "user", "content": "hi"}],
                            SamplingParams(temperature=0, max_tokens=16))
    assert deltas[-1].finish_reason in ("stop", "length")
    assert deltas[-1].prompt_tokens == len(phi3_engine.model.encode_prompt(
        [{"role": "user", "content": "hi"}]))


async def test_same_seed_same_output(phi3_engine: ChatEngine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    first = await _collect(phi3_engine, FRANCE, params)
    second = await _collect(phi3_engine, FRANCE, params)
    other = await _collect(phi3_engine, FRANCE, SamplingParams(temperature=1.0, seed=99,
                                                                max_tokens=20))
    assert "".join(d.text for d in first) == "".join(d.text for d in second)
    assert "".join(d.text for d in first) != "".join(d.text for d in other)


async def test_stop_string_ends_generation_and_is_not_emitted(smol_engine: ChatEngine) -> None:
    deltas = await _collect(smol_engine, FRANCE,
                            SamplingParams(temperature=0, max_tokens=40, stop=("Paris",)))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and "Paris" not in text and text


async def test_concurrent_streams_interleave(smol_engine: ChatEngine) -> None:
    order: list[str] = []

    async def run(name: str) -> None:
        params = SamplingParams(temperature=0, max_tokens=12)
        async with await smol_engine.start(STORY, params) as stream:
            async for _ in stream:
                order.append(name)

    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(run, name)
    assert sorted(order) == sorted("abc" * 12)
    # every stream made progress before any of them finished
    first_finish = min(max(i for i, n in enumerate(order) if n == name) for name in "abc")
    assert set(order[: first_finish + 1]) == set("abc")


async def test_consumer_leaving_stops_decoding(smol_engine: ChatEngine) -> None:
    stats = smol_engine.stats
    before_steps, before_cancelled = stats.decode_runs_total, stats.cancelled_total
    async with await smol_engine.start(FRANCE, SamplingParams(temperature=0,
                                                              max_tokens=500)) as stream:
        for _ in range(3):
            await stream.receive()
    with anyio.fail_after(5):
        while smol_engine.running:  # noqa: ASYNC110 - polling the engine as an observer would
            await anyio.sleep(0.01)
    assert stats.cancelled_total == before_cancelled + 1
    assert stats.decode_runs_total - before_steps <= 5  # not 500


async def test_prompt_over_context_is_rejected(phi3_engine: ChatEngine) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(ContextTooLong, match="maximum context length is 4096"):
        await phi3_engine.start(long, SamplingParams())
    with pytest.raises(ContextTooLong):
        await phi3_engine.start(FRANCE, SamplingParams(max_tokens=4096))


async def test_full_queue_is_overloaded(phi3_engine: ChatEngine,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    streams = []
    encoded = 0
    encode = phi3_engine.model.encode_prompt

    def counting(messages: list[dict[str, str]]) -> list[int]:
        nonlocal encoded
        encoded += 1
        return encode(messages)

    monkeypatch.setattr(phi3_engine.model, "encode_prompt", counting)
    try:
        with pytest.raises(Overloaded):
            for _ in range(10):  # 2 running + 2 waiting fit; the scheduler admits in turn
                streams.append(await phi3_engine.start(FRANCE, SamplingParams(max_tokens=200)))
        with pytest.raises(Overloaded):
            await phi3_engine.start(FRANCE, SamplingParams(max_tokens=200))
        assert encoded == len(streams)  # refusals come before tokenizing: they cost nothing
    finally:
        for s in streams:
            s.close()


async def test_engine_not_running_is_unavailable(phi3: ChatModel) -> None:
    with pytest.raises(BackendUnavailable):
        await ChatEngine(phi3).start(FRANCE, SamplingParams())


async def test_step_failure_reaches_the_consumer(phi3: ChatModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async for engine in _engine(phi3):
        def broken(*args: object) -> None:
            raise RuntimeError("device lost")
        async with await engine.start(FRANCE, SamplingParams(max_tokens=5)) as stream:
            monkeypatch.setattr(engine.model, "prefill", broken)
            with pytest.raises(BackendUnavailable, match="device lost"):
                await stream.receive()
        assert engine.stats.failed_total == 1
