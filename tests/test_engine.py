from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np
import pytest

from inference.chat.engine import ChatDelta, ChatEngine, Constraint
from inference.chat.grammar import json_schema_grammar
from inference.chat.kv_pool import GRANULARITY, KVPool
from inference.chat.model import ChatModel
from inference.chat.sampling import SamplingParams
from inference.errors import BackendUnavailable, ContextTooLong, InvalidInput, Overloaded
from tests.conftest import chat_engine, greedy_reference, running

pytestmark = pytest.mark.anyio
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture
async def smol_engine(smollm2: ChatModel) -> AsyncIterator[ChatEngine]:
    async with running(chat_engine(smollm2)) as e:
        yield e


@pytest.fixture
async def phi3_engine(phi3: ChatModel) -> AsyncIterator[ChatEngine]:
    async with running(chat_engine(phi3, max_running=2, max_waiting=2)) as e:
        yield e


async def _collect(engine: ChatEngine, messages: list[dict[str, str]],
                   params: SamplingParams) -> list[ChatDelta]:
    async with await engine.start(messages, params) as stream:
        return [d async for d in stream]


async def test_greedy_smollm2_follows_the_plain_loop(smol_engine: ChatEngine) -> None:
    deltas = await _collect(smol_engine, FRANCE, SamplingParams(temperature=0, max_tokens=24))
    text = "".join(d.text for d in deltas)
    assert (text, deltas[-1].finish_reason) == greedy_reference(smol_engine.model, FRANCE, 24)
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
    # a stop string from the middle of what the model answers: the answer ends just before it
    reference, _ = greedy_reference(smol_engine.model, FRANCE, 40)
    middle = len(reference) // 2
    stop = reference[middle:middle + 4]
    assert stop.strip(), reference
    deltas = await _collect(smol_engine, FRANCE,
                            SamplingParams(temperature=0, max_tokens=40, stop=(stop,)))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and text == reference[:reference.index(stop)]


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


async def test_deltas_reach_the_consumer_while_the_round_runs(smollm2: ChatModel) -> None:
    # A round that never ends on its own: the deltas must still go out step by step (the
    # event loop is woken as each model run starts), not all at once when the round ends.
    async with running(chat_engine(smollm2, round_s=3600)) as engine:
        runs_seen: list[int] = []
        params = SamplingParams(temperature=0, max_tokens=40)
        async with await engine.start(STORY, params) as stream:
            async for _ in stream:
                runs_seen.append(engine.stats.decode_runs_total)
        assert len(runs_seen) == 40
        assert runs_seen[0] <= 3 and runs_seen[20] <= 23, runs_seen


async def test_consumer_leaving_stops_decoding(smol_engine: ChatEngine) -> None:
    stats = smol_engine.stats
    before_steps, before_cancelled = stats.decode_runs_total, stats.cancelled_total
    async with await smol_engine.start(FRANCE, SamplingParams(temperature=0,
                                                              max_tokens=500)) as stream:
        for _ in range(3):
            await stream.receive()
    with anyio.fail_after(5):  # the row is freed on the device thread, then the generation
        # is closed on the event loop
        while smol_engine.running or stats.cancelled_total == before_cancelled:  # noqa: ASYNC110
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

    def counting(messages: list[dict[str, str]], tools: object = None) -> list[int]:
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
        await chat_engine(phi3).start(FRANCE, SamplingParams())


async def test_step_failure_reaches_the_consumer(phi3: ChatModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(chat_engine(phi3)) as engine:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("device lost")
        async with await engine.start(FRANCE, SamplingParams(max_tokens=5)) as stream:
            monkeypatch.setattr(engine.model, "prepare_prefill", broken)
            with pytest.raises(BackendUnavailable, match="device lost"):
                await stream.receive()
        assert engine.stats.failed_total == 1


# --- continuous batching ------------------------------------------------------------------

MIXED = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a poem about the sea, the wind, the rain and the "
      "lighthouse that stands between them, watching ships pass in the night."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three facts about cats. " * 12}],  # > one chunk
]


async def _text(engine: ChatEngine, messages: list[dict[str, str]], params: SamplingParams,
                delay: float = 0.0) -> str:
    await anyio.sleep(delay)
    return "".join(d.text for d in await _collect(engine, messages, params))


async def _text_into(out: dict[int, str], i: int, engine: ChatEngine, params: SamplingParams,
                     delay: float) -> None:
    out[i] = await _text(engine, MIXED[i], params, delay)


async def _read_then_leave(engine: ChatEngine, messages: list[dict[str, str]]) -> None:
    # sampled, so end-of-text is banned: an answer that ends within 5 tokens is not a leaver
    never_ends = SamplingParams(max_tokens=500, logit_bias=tuple(
        (eos, -100.0) for eos in engine.model.spec.eos_token_ids))
    async with await engine.start(messages, never_ends) as stream:
        for _ in range(5):
            await stream.receive()


# On a build that is not batch-invariant (`ChatModel.batch_invariant`: the Phi-3 fixture), a
# one-row step moves the logits by up to 2.4e-7 against a batched one, and the difference
# carries on through the KV cache written at each step: measured up to 1.7e-3 in
# log-probability after 400 tokens. A wrong row or position would move them by far more.
DRIFT_BOUND = 1e-2


@dataclasses.dataclass(frozen=True)
class _Pick:
    token: bytes
    logprob: float
    lead: float  # over the runner-up, in log-probability


async def _picks(engine: ChatEngine, messages: list[dict[str, str]], params: SamplingParams,
                 delay: float = 0.0) -> list[_Pick]:
    await anyio.sleep(delay)
    params = dataclasses.replace(params, logprobs=True, top_logprobs=2)
    return [_Pick(t.token, t.logprob, t.top[0][1] - t.top[1][1] if len(t.top) > 1 else 1.0)
            for d in await _collect(engine, messages, params) for t in d.logprobs]


@pytest.mark.parametrize(("model_name", "tokens", "gap"), [("smollm2", 40, 0.1),
                                                           ("phi3", 400, 0.01)])
async def test_greedy_batched_equals_alone(model_name: str, tokens: int, gap: float,
                                           request: pytest.FixtureRequest) -> None:
    # prompts of mixed length (one spans several prefill chunks) that join mid-stream:
    # staggered starts, and different lengths make them leave at different steps
    model: ChatModel = request.getfixturevalue(model_name)
    params = SamplingParams(temperature=0, max_tokens=tokens)
    async with running(chat_engine(model, max_running=8)) as engine:
        alone = [await _picks(engine, m, params) for m in MIXED]
    together: dict[int, list[_Pick]] = {}

    async def into(i: int, engine: ChatEngine) -> None:
        together[i] = await _picks(engine, MIXED[i], params, i * gap)

    async with running(chat_engine(model, max_running=8)) as engine:
        async with anyio.create_task_group() as tg:
            for i in range(len(MIXED)):
                tg.start_soon(into, i, engine)
    assert engine.stats.decode_rows_total > engine.stats.decode_runs_total  # really batched
    for i, mine in enumerate(alone):
        theirs = together[i]
        if model.batch_invariant:
            assert theirs == mine
            continue
        # else close, and the same tokens up to a pick that the drift between them explains
        split = next((k for k, (a, b) in enumerate(zip(mine, theirs, strict=False))
                      if a.token != b.token), None)
        shared = len(mine) if split is None else split
        drift = max(abs(a.logprob - b.logprob) for a, b in zip(mine[:shared], theirs[:shared],
                                                               strict=True))
        assert drift < DRIFT_BOUND, (i, drift)
        if split is None:
            assert len(theirs) == len(mine)
        else:  # each run's pick led the other's by less than the bound
            assert mine[split].lead + theirs[split].lead < DRIFT_BOUND, (i, split)


@pytest.mark.parametrize("model_name", ["smollm2", "phi3"])
def test_the_probe_agrees_with_another_measurement(model_name: str,
                                                   request: pytest.FixtureRequest) -> None:
    """Whether a one-row step matches a batched one depends on the build and on the CPU
    (onnxruntime's int4 MatMulNBits sums a single row in another order on AVX2 machines and
    not on AVX-512 ones), so the probe's verdict is checked against a second measurement
    (another prompt, three rows) rather than against one machine's
    answer."""
    model: ChatModel = request.getfixturevalue(model_name)
    prompt = model.encode_texts(["Two ships passed in the night, far from any harbour."])[0]
    layout = model.kv_layout()
    pool = KVPool(layout, max_rows=3, budget_bytes=3 * GRANULARITY * layout.bytes_per_token)
    for _ in range(3):
        model.prefill(pool, pool.add(len(prompt) + 1), prompt)
    together = model.decode(pool, [7, 7, 7])[0].copy()
    pool.set_length(0, len(prompt))
    alone = model.decode(pool, [7])[0]  # a one-row run: row 0
    assert model.batch_invariant == bool(np.array_equal(alone, together))


@pytest.mark.parametrize("model_name", ["smollm2", "phi3"])
async def test_seeded_sampling_ignores_which_mates(model_name: str,
                                                   request: pytest.FixtureRequest) -> None:
    # What docs/decisions/0001 promises: with a seed, a choice's text does not depend on which other
    # sequences share its steps, how many, or when they join, as long as it is never alone.
    # A companion stream keeps every step at two rows or more.
    model: ChatModel = request.getfixturevalue(model_name)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=30)

    async def seeded_with(companion: list[dict[str, str]], delays: list[float]) -> list[str]:
        out: dict[int, str] = {}
        async with running(chat_engine(model, max_running=8)) as engine:
            endless = SamplingParams(max_tokens=2000, logit_bias=tuple(
                (eos, -100.0) for eos in model.spec.eos_token_ids))
            async with await engine.start(companion, endless) as keep:
                await keep.receive()  # decoding before any seeded row joins
                async with anyio.create_task_group() as tg:
                    for i in range(len(MIXED)):
                        tg.start_soon(_text_into, out, i, engine, params, delays[i])
        return [out[i] for i in range(len(MIXED))]

    first = await seeded_with(STORY, [0.1, 0, 0.02, 0.05])
    second = await seeded_with(FRANCE, [0, 0.07, 0.01, 0.2])
    assert first == second
    if model.batch_invariant:  # then alone too
        async with running(chat_engine(model, max_running=8)) as engine:
            alone = [await _text(engine, m, params) for m in MIXED]
        assert alone == first


async def test_joining_leaving_and_cancelling_mid_stream(smollm2: ChatModel) -> None:
    params = SamplingParams(temperature=0, max_tokens=30)
    async with running(chat_engine(smollm2, max_running=4)) as engine:
        expected = [await _text(engine, m, params) for m in MIXED[:3]]
        results: dict[int, str] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(_text_into, results, 0, engine, params, 0.0)
            tg.start_soon(_read_then_leave, engine, MIXED[3])
            tg.start_soon(_text_into, results, 1, engine, params, 0.1)
            tg.start_soon(_text_into, results, 2, engine, params, 0.25)
        assert [results[i] for i in range(3)] == expected
        with anyio.fail_after(5):
            while not engine.idle:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        # nothing runs; the buffer stays only while it holds kept prompts (prompt cache)
        assert engine.pool.in_use == 0
        assert (engine.pool.allocated_bytes > 0) == (engine.cache_stats()["entries"] > 0)
        assert engine.stats.cancelled_total == 1


async def test_n_choices_share_one_prefill(phi3: ChatModel) -> None:
    async with running(chat_engine(phi3, max_running=4)) as engine:
        greedy = await _text(engine, FRANCE, SamplingParams(temperature=0, max_tokens=12))
        prefills = engine.stats.prefill_runs_total
        async with await engine.start(FRANCE, SamplingParams(temperature=0, max_tokens=12),
                                      n=3) as stream:
            deltas = [d async for d in stream]
        assert engine.stats.prefill_runs_total == prefills + 1  # the prompt is read once
        texts = ["".join(d.text for d in deltas if d.index == i) for i in range(3)]
        assert texts == [texts[0]] * 3  # greedy: every choice is the same answer
        assert texts[0] == greedy or not phi3.batch_invariant  # alone vs three rows
        assert {d.finish_reason for d in deltas if d.finish_reason} == {"length"}
        async with await engine.start(FRANCE, SamplingParams(temperature=1.0, seed=7,
                                                             max_tokens=12), n=3) as stream:
            sampled = [d async for d in stream]
        texts = ["".join(d.text for d in sampled if d.index == i) for i in range(3)]
        assert len(set(texts)) == 3  # each choice draws from its own generator
        with pytest.raises(InvalidInput, match="5 choices need 5 decode slots"):
            await engine.start(FRANCE, SamplingParams(), n=5)


async def test_kv_budget_makes_requests_wait_never_crash(phi3: ChatModel) -> None:
    # room for about one 600-token sequence: the second waits for the first to finish
    per_token = phi3.kv_layout().bytes_per_token
    async with running(chat_engine(phi3, max_running=4, max_waiting=1,
                                   kv_budget_bytes=700 * per_token)) as engine:
        params = SamplingParams(temperature=0, max_tokens=500)
        first = await engine.start(FRANCE, params)
        with anyio.fail_after(5):
            while engine.running < 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        second = await engine.start(FRANCE, params)
        with anyio.fail_after(5):
            while engine.waiting < 1:  # noqa: ASYNC110 - held back for KV room
                await anyio.sleep(0.01)
        with pytest.raises(Overloaded):  # the queue (1) is full
            await engine.start(FRANCE, params)
        async with first, second:
            await first.receive()
            assert engine.running == 1 and engine.waiting == 1
            assert engine.pool.allocated_bytes <= engine.pool.budget_bytes
            rest = [d async for d in first]
            assert rest[-1].finish_reason is not None
            assert [d async for d in second][-1].finish_reason is not None
        with pytest.raises(InvalidInput, match="KV cache"):  # could never fit
            await engine.start(FRANCE, SamplingParams(max_tokens=1000))
        # a request that leaves out max_tokens gets what fits
        async with await engine.start(FRANCE, SamplingParams(temperature=0)) as stream:
            last = [d async for d in stream][-1]
        assert last.prompt_tokens + last.completion_tokens <= 700


async def test_disconnect_stops_a_long_prefill_at_the_next_chunk(smollm2: ChatModel) -> None:
    long = [{"role": "user", "content": "Tell me a story. " * 600}]  # ~3000 tokens
    async with running(chat_engine(smollm2, max_running=4)) as engine:
        stream = await engine.start(long, SamplingParams(max_tokens=5))
        with anyio.fail_after(10):
            while engine.stats.prefill_runs_total < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        stream.close()  # the client leaves mid-prefill
        with anyio.fail_after(5):
            while not engine.idle:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        chunks = -(-stream.prompt_tokens // 64)
        assert engine.stats.prefill_runs_total < chunks / 2  # stopped long before the end
        # and the next request is served at once
        t = anyio.current_time()
        await _text(engine, FRANCE, SamplingParams(temperature=0, max_tokens=3))
        assert anyio.current_time() - t < 5


async def test_prefill_chunks_share_a_slice_between_decode_steps(phi3: ChatModel) -> None:
    # While a stream decodes, a long prompt is read several chunks per slice (up to 100 ms
    # between decode steps), not one chunk per step.
    runs: list[str] = []
    engine = chat_engine(phi3, max_running=4)
    engine.on_run = lambda kind, rows, tokens, seconds: runs.append(kind)
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        async with await engine.start(FRANCE, SamplingParams(temperature=0,
                                                             max_tokens=2000)) as running:
            for _ in range(3):
                await running.receive()
            before = len(runs)
            long = [{"role": "user", "content": "word " * 1000}]  # about 16 chunks
            await _collect(engine, long, SamplingParams(temperature=0, max_tokens=2))
        tg.cancel_scope.cancel()
    after = runs[before:]
    assert after.count("prefill") >= 10 and "decode" in after
    longest = max(len(run) for run in "".join(k[0] for k in after).split("d"))
    assert longest >= 3, after  # several chunks in a row, no decode step between them


@pytest.mark.parametrize("model_name", ["smollm2", "phi3"])
async def test_prefill_reads_larger_chunks_while_nothing_decodes(
        model_name: str, request: pytest.FixtureRequest) -> None:
    # Alone, a long prompt is read `prefill_chunk_idle` tokens per run; while a stream
    # decodes, `prefill_chunk` tokens per run (the running stream waits one chunk at a time).
    # The default int8 build's numbers do not depend on the chunks (decision 6).
    model: ChatModel = request.getfixturevalue(model_name)
    runs: list[tuple[str, int]] = []
    engine = chat_engine(model, max_running=4, prefill_chunk=64, prefill_chunk_idle=256,
                         prompt_cache=False)  # the second read is a whole prefill too
    engine.on_run = lambda kind, rows, tokens, seconds: runs.append((kind, tokens))
    long = [{"role": "user", "content": "word " * 1000}]
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        alone = await _collect(engine, long, SamplingParams(temperature=0, max_tokens=8))
        idle = [n for kind, n in runs if kind == "prefill"]
        runs.clear()
        async with await engine.start(STORY, SamplingParams(temperature=0,
                                                            max_tokens=2000)) as running:
            for _ in range(3):
                await running.receive()
            before = len(runs)
            beside = await _collect(engine, long, SamplingParams(temperature=0, max_tokens=8))
        tg.cancel_scope.cancel()
    busy = [n for kind, n in runs[before:] if kind == "prefill"]
    assert max(idle) == 256 and len(idle) == -(-alone[-1].prompt_tokens // 256)
    assert max(busy) == 64 and len(busy) >= alone[-1].prompt_tokens // 64
    # the chunks differ, the answer does not
    assert "".join(d.text for d in beside) == "".join(d.text for d in alone)


# --- grammar work: bounded, once per request, refused cheaply, and freed by a leaving client

# OpenAI's largest strict schema, 5,000 required properties: within budget, about 0.3 s to
# compile here
HEAVY = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)},
         "required": [f"p{i}" for i in range(5000)]}


def _heavy() -> Constraint:
    return Constraint(json_schema_grammar(HEAVY), "response_format")


async def test_a_full_queue_refuses_before_any_compile(phi3: ChatModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    compiles: list[int] = []
    compile_matchers = phi3.guide.matchers

    def counting(grammar: str, count: int, *, param: str) -> Any:
        compiles.append(count)
        return compile_matchers(grammar, count, param=param)

    monkeypatch.setattr(phi3.guide, "matchers", counting)
    refusals: list[float] = []
    heavy = _heavy()  # the grammar text, built once: the ten starts come at once
    async with running(chat_engine(phi3, max_running=2, max_waiting=2)) as engine:
        async def one(engine: ChatEngine) -> None:
            started = time.perf_counter()
            try:
                async with await engine.start(FRANCE, SamplingParams(max_tokens=1),
                                              grammar=heavy) as stream:
                    async for _ in stream:
                        pass
            except Overloaded:
                refusals.append(time.perf_counter() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one, engine)
    # two requests fill the queue while they compile; the other eight are refused at once,
    # and never compiled
    assert len(refusals) == 8 and len(compiles) == 2
    assert max(refusals) < 0.1


async def test_clients_leaving_during_compiles_free_the_cpu(phi3: ChatModel) -> None:
    phi3.guide.matchers(json_schema_grammar({"type": "object"}), 1, param="p")  # warm up
    async with running(chat_engine(phi3, max_running=8, max_waiting=16)) as engine:
        async def leave_early(engine: ChatEngine) -> None:
            with anyio.move_on_after(0.05):
                async with await engine.start(FRANCE, SamplingParams(max_tokens=1),
                                              grammar=_heavy(), n=8):
                    pass

        cpu = time.process_time()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(leave_early, engine)
        await anyio.sleep(1.0)  # whatever goes on after the clients left
        used = time.process_time() - cpu
        assert engine.waiting == 0 and engine.running == 0
    # one compile at most ran (about 0.3 s), its 8 choices copies of it; before, each request
    # compiled once per choice and once more to validate, in parallel: 72 compiles, ~20 s
    assert used < 2.0, used


# --- a consumer that stops reading pauses its generation, and one that never reads ends it


async def test_a_consumer_that_stops_reading_pauses_its_generation(phi3: ChatModel) -> None:
    async with running(chat_engine(phi3)) as engine:
        # sampled, so the end-of-text tokens are banned: an early end is not what is tested
        never_ends = SamplingParams(max_tokens=600, logit_bias=tuple(
            (eos, -100.0) for eos in phi3.spec.eos_token_ids))
        async with await engine.start(FRANCE, never_ends) as stream:
            with anyio.fail_after(10):
                while engine.stats.paused_total == 0:  # noqa: ASYNC110 - observing
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)  # paused: no more steps while nobody reads
            runs = engine.stats.decode_runs_total
            await anyio.sleep(0.3)
            assert engine.stats.decode_runs_total == runs
            assert runs <= engine.limits.unread_per_choice + 2  # not 600
            deltas = [d async for d in stream]  # reading resumes it, to the end
        assert len(deltas) == 600 and deltas[-1].finish_reason == "length"


async def test_a_consumer_that_never_reads_is_cancelled_after_the_stall_time(phi3: ChatModel
                                                                             ) -> None:
    async with running(chat_engine(phi3, stall_s=0.3)) as engine:
        async with await engine.start(FRANCE, SamplingParams(max_tokens=600)):
            with anyio.fail_after(10):
                while engine.stats.cancelled_total == 0:  # noqa: ASYNC110 - observing
                    await anyio.sleep(0.02)
        assert engine.stats.stalled_total == 1 and engine.running == 0
        assert engine.stats.decode_runs_total <= 70  # not 600


class _Watched(list):  # type: ignore[type-arg]
    """A list that records the threads that read or change it."""

    def __init__(self, items: list[Any]) -> None:
        self.threads: set[int] = set()
        super().__init__(items)


def _watch(name: str) -> Any:
    def method(self: _Watched, *args: Any) -> Any:
        self.threads.add(threading.get_ident())
        return getattr(list, name)(self, *args)
    return method


for _name in ("__iter__", "__getitem__", "__setitem__", "__len__", "append", "pop", "clear"):
    setattr(_Watched, _name, _watch(_name))


async def test_commands_and_rounds_never_share_the_batch_state(phi3: ChatModel) -> None:
    """Cancel storms and a stop-all while rounds release rows (each release slowed down, so
    the two overlap): the running rows are only ever touched by the device thread, every
    stream ends, and every generation is counted once."""
    async with running(chat_engine(phi3, max_running=8, max_waiting=64)) as engine:
        rows = _Watched(engine._rows)
        engine._rows = rows
        remove = engine.pool.remove

        def slow_remove(row: int) -> int | None:  # rows compact here
            time.sleep(0.002)
            return remove(row)
        engine.pool.remove = slow_remove  # type: ignore[method-assign]
        params = SamplingParams(temperature=0.8, seed=1, max_tokens=48)
        outcomes: list[str] = []

        async def one(leave_after: int) -> None:
            try:
                async with await engine.start(STORY, params) as stream:
                    async for delta in stream:
                        if delta.completion_tokens == leave_after:
                            outcomes.append("left")  # leaving closes: a cancel command
                            return
                outcomes.append("completed")
            except BackendUnavailable:
                outcomes.append("stopped")

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for wave in range(4):
                    for i in range(12):
                        tg.start_soon(one, 1 + (i * 7 + wave) % 60)
                    await anyio.sleep(0.05)
                await anyio.sleep(0.2)
                engine.stop_all(BackendUnavailable("stopped by the test"))
            while not engine.idle or engine.pool.in_use:  # noqa: ASYNC110 - observing
                await anyio.sleep(0.01)
        assert len(outcomes) == 48 and {"left", "stopped"} <= set(outcomes)
        assert rows.threads and threading.get_ident() not in rows.threads
        s = engine.stats
        assert s.requests_total == s.completed_total + s.cancelled_total + s.failed_total
        assert engine.running == engine.waiting == 0


async def test_requests_with_free_rows_are_not_counted_as_waiting(phi3: ChatModel) -> None:
    """Admission runs on the device thread, so the event loop counts a request as waiting only
    beyond the rows the running ones leave free: two requests for two free rows are both
    taken with a queue of one, the third waits, and the fourth is refused."""
    params = SamplingParams(temperature=0, max_tokens=2000)
    async with running(chat_engine(phi3, max_running=2, max_waiting=1)) as engine:
        streams = [await engine.start(FRANCE, params) for _ in range(3)]
        try:
            with pytest.raises(Overloaded):
                await engine.start(FRANCE, params)
            with anyio.fail_after(10):
                while engine.running < 2:  # noqa: ASYNC110 - observing
                    await anyio.sleep(0.01)
            assert engine.waiting == 1
        finally:
            for stream in streams:
                stream.close()
