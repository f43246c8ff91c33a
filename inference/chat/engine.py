"""The decode scheduler of one chat model: continuous batching over a shared KV pool.

Requests wait in a bounded queue and join when the pool has room for them (a row per choice,
and their reserved tokens). On the device thread, off the event loop, each iteration runs at
most one prefill chunk (for the oldest sequence still reading its prompt) and one decode step
for every sequence that is generating: a single model run for all of them. A sequence joins
the decode batch at the step after its prefill, and leaves (freeing its row at once) when it
finishes, is cancelled, or its consumer goes away.

Prefill runs in chunks of a fixed size, so a long prompt stalls running streams for one chunk
at a time, a consumer that leaves stops its prefill at the next chunk, and a sequence's
numerics never depend on its batch mates (chunk boundaries do change int8 kernels' rounding,
so they must not depend on load).

A consumer that stops reading (a slow or stalled client, over SSE or the WebSocket alike)
pauses its generation: past `UNREAD_PER_CHOICE` undelivered deltas per choice it keeps its row
but is not stepped, and it resumes once its consumer catches up. Paused for `stall_s`, it is
cancelled. So a client that never reads costs a bounded number of tokens, not `max_tokens`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
from anyio.abc import TaskStatus

from inference.chat.grammar import Matcher
from inference.chat.kv_pool import KVPool
from inference.chat.model import ChatModel
from inference.chat.prompt_cache import PromptCache
from inference.chat.sampling import SamplingParams
from inference.chat.sequence import ChatDelta, Choice, Generation
from inference.chat.spec import SamplingDefaults
from inference.chat.stream import DeltaStream, GenerationStream
from inference.errors import (
    BackendUnavailable,
    ContextTooLong,
    InferenceError,
    InvalidInput,
    Overloaded,
)

__all__ = ["ChatDelta", "ChatEngine", "Constraint", "DeltaStream", "EngineStats",
           "GenerationStream"]
log = logging.getLogger(__name__)
DEFAULT_KV_BUDGET = 2 * 1024**3
DEFAULT_PREFILL_CHUNK = 64
# What kept prompt prefixes may hold of the KV budget (the attack run saw 14 entries hold
# 603 MiB, and rising): about 5,700 tokens of SmolLM2-135M's fp32 KV
DEFAULT_PROMPT_CACHE_BYTES = 256 * 2**20
PREFILL_SLICE_S = 0.1  # prefill time between two decode steps, beyond the first chunk
# A generation whose consumer has this many undelivered deltas per choice waits for it (a
# second or two of tokens: streaming clients that read do not get near it) ...
UNREAD_PER_CHOICE = 64
STALL_S = 60.0  # ... and is cancelled when it has waited this long
PAUSED_POLL_S = 0.02  # how often a round whose rows all wait looks for a reader
# Per model run: "prefill" or "decode", rows in the run, new tokens, seconds; and per step
# with constrained rows, "mask", the rows whose grammar masks were filled, and the seconds
# that took. Called on the device thread.
RunObserver = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class Constraint:
    """A grammar (llguidance's text, see `inference.chat.grammar`) every choice must follow,
    and the request parameter that asked for it (named by errors)."""

    grammar: str
    param: str


@dataclass
class EngineStats:
    """Monotonic counters, for /health and metrics."""

    requests_total: int = 0
    completed_total: int = 0
    cancelled_total: int = 0
    failed_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    prefill_runs_total: int = 0  # model runs that read prompt chunks
    decode_runs_total: int = 0  # model runs that step every generating sequence once
    decode_rows_total: int = 0  # sequences stepped, summed over decode runs
    paused_total: int = 0  # generations paused because their consumer stopped reading
    stalled_total: int = 0  # ... and cancelled after `stall_s` paused

    @property
    def model_runs_total(self) -> int:
        return self.prefill_runs_total + self.decode_runs_total


class ChatEngine:
    """Schedules generations on one `ChatModel`. Call `run()` in a task group first.

    Steps happen in rounds on the device thread; every delta is posted to the event loop
    without waiting for it, so per-token HTTP work never sits between two steps. A round ends
    when a request arrives (to admit it), when nothing runs, or after `round_s`, so shutdown
    never waits long. Runs on asyncio (which Quart and Hypercorn use).
    """

    def __init__(self, model: ChatModel, *, max_running: int = 8, max_waiting: int = 16,
                 round_s: float = 0.25, default_max_tokens: int | None = None,
                 kv_budget_bytes: int = DEFAULT_KV_BUDGET,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prompt_cache: bool = True,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 on_run: RunObserver | None = None, stall_s: float = STALL_S) -> None:
        self.model = model
        self.model_id = model.spec.model_id
        self.stats = EngineStats()
        self.pool = KVPool(model.kv_layout(), budget_bytes=kv_budget_bytes,
                           max_rows=max_running, spare_rows=max_running if prompt_cache else 0)
        self.cache = PromptCache(chunk=prefill_chunk, enabled=prompt_cache,
                                 max_tokens=prompt_cache_bytes // self.pool.layout.bytes_per_token)
        self.on_run = on_run
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._round_s = round_s
        self._prefill_chunk = prefill_chunk
        self._default_max_tokens = default_max_tokens  # when a request sets none
        self._stall_s = stall_s  # a generation paused this long is cancelled
        self._rows: list[Choice] = []  # the running choices; choice i holds pool row i
        self._waiting: deque[Generation] = deque()
        self._device = anyio.CapacityLimiter(1)
        # Grammars compile one at a time per model, in a worker thread: a compile cannot be
        # stopped once it runs, so a request still waiting here when its client leaves costs
        # nothing, and one compiling costs at most schema_check's budget.
        self._compiling = anyio.CapacityLimiter(1)
        self._compiles = 0  # requests waiting for or in a compile: they count as waiting
        self._wakeup = anyio.Event()
        self._arrival = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._posted: list[tuple[Callable[..., None], tuple[object, ...]]] = []
        self._accepting = False

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """What a request that leaves sampling fields unset gets (the model folder's)."""
        return self.model.spec.sampling

    @property
    def running(self) -> int:
        """Generations admitted and not yet finished."""
        return len({id(c.generation) for c in self._rows})

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._rows

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids (special tokens kept, as a prompt holds them)."""
        return str(self.model.tokenizer.decode(token_ids, skip_special_tokens=False))

    def kv_usage(self) -> dict[str, int]:
        """The KV pool's budget, allocation and use, for /health and /metrics."""
        return self.pool.describe()

    @property
    def batch_invariant(self) -> bool:
        """Whether a sequence decoded alone gets the same logits as batched (see README: what
        seeded sampling promises)."""
        return self.model.batch_invariant

    def cache_stats(self) -> dict[str, int | bool]:
        """The prompt cache's counters, for /health and /metrics."""
        return {"enabled": self.cache.enabled, **dataclasses.asdict(self.cache.stats)}

    @property
    def supports_tools(self) -> bool:
        """The model's chat template reads tool definitions itself."""
        return self.model.template.supports_tools

    async def start(self, messages: list[dict[str, Any]], params: SamplingParams, *,
                    n: int = 1, grammar: Constraint | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    cache_scope: str = "") -> GenerationStream:
        """Queue a chat generation of `n` choices, each following `grammar` if one is given.
        `tools` go to templates that read them. Only prompt-cache entries of `cache_scope` are
        reused. Raises before anything streams if it cannot be served."""
        if not messages:
            raise InvalidInput("messages must not be empty", param="messages")
        self._check_start(params, n)

        def prepare() -> tuple[list[int], list[Matcher] | None]:
            # off the event loop and the device thread: templates, tokenizing, and
            # compiling a grammar (a hostile one is bounded by grammar.limits) take a while
            prompt = self.model.encode_prompt(messages, tools)
            if grammar is None:
                return prompt, None
            return prompt, self.model.guide.matchers(grammar.grammar, n, param=grammar.param)

        if grammar is None:
            prompt, matchers = await anyio.to_thread.run_sync(prepare)
        else:
            self._compiles += 1
            try:
                async with self._compiling:
                    prompt, matchers = await anyio.to_thread.run_sync(prepare)
            finally:
                self._compiles -= 1
        return self._enqueue([prompt], params, n, param="messages", matchers=matchers,
                             cache_scope=cache_scope)

    async def start_completion(self, prompts: list[str] | list[list[int]],
                               params: SamplingParams, *, n: int = 1,
                               cache_scope: str = "") -> GenerationStream:
        """Queue a plain-text completion: `n` choices for each prompt (text, or token ids of
        this model's vocabulary), no chat template; prompt cache as in `start`."""
        if not prompts:
            raise InvalidInput("prompt must not be empty", param="prompt")
        self._check_start(params, n * len(prompts))
        if isinstance(prompts[0], str):
            texts = [str(p) for p in prompts]
            ids = await anyio.to_thread.run_sync(self.model.encode_texts, texts)
        else:  # up to max_running x context ids: checked off the event loop too
            ids = [list(map(int, p)) for p in prompts]
            await anyio.to_thread.run_sync(self.model.check_token_ids, ids)
        return self._enqueue(ids, params, n, param="prompt", cache_scope=cache_scope)

    def check_prompt_shape(self, prompts: int, id_lengths: list[int]) -> None:
        """Cheap checks before a request is validated in full: no more prompts than decode
        slots, no token-id prompt longer than the context."""
        if prompts > self._max_running:
            raise InvalidInput(f"{prompts} prompts need {prompts} decode slots; this server "
                               f"runs at most {self._max_running} per model", param="prompt")
        context = self.model.spec.context_length
        for length in id_lengths:
            if length >= context:
                raise ContextTooLong(f"this model's maximum context length is {context} "
                                     f"tokens, but a prompt has {length}", param="prompt")

    def _check_start(self, params: SamplingParams, choices: int) -> None:
        if not self._accepting:
            raise BackendUnavailable(f"model {self.model_id} is not running")
        if choices > self._max_running:
            raise InvalidInput(f"{choices} choices need {choices} decode slots; this server "
                               f"runs at most {self._max_running} per model", param="n")
        for token, _ in params.logit_bias:
            if token >= self.model.vocab_size:
                raise InvalidInput(f"logit_bias names token {token}; this model's vocabulary "
                                   f"has {self.model.vocab_size} tokens", param="logit_bias")
        self._check_queue()  # before tokenizing: an overloaded server refuses cheaply

    def _enqueue(self, prompts: list[list[int]], params: SamplingParams, n: int, *,
                 param: str, matchers: list[Matcher] | None = None,
                 cache_scope: str = "") -> GenerationStream:
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise InvalidInput("a prompt has no tokens", param=param)
        max_tokens = self._max_tokens(longest, params.max_tokens, param)
        needs = [len(p) + max_tokens for p in prompts for _ in range(n)]
        if not self.pool.fits(needs, alone=True):
            budget = self.pool.budget_bytes // 2**20
            raise InvalidInput(
                f"{len(needs)} choices of up to {max(needs)} tokens each need more KV cache "
                f"than this server's budget of {budget} MiB holds; ask for fewer choices or "
                "tokens", param="n")
        self._check_queue()  # again: others may have queued while this prompt was tokenized
        send, receive = anyio.create_memory_object_stream[ChatDelta | InferenceError](
            max_buffer_size=len(needs) * max_tokens + 2)  # one item per step at most: bounded
        gen = Generation(self.model, prompts, params, max_tokens, n, send, matchers,
                         cache_scope)
        self._waiting.append(gen)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += gen.prompt_tokens
        self._arrival.set()
        self._wakeup.set()
        return GenerationStream(gen, receive)

    def _max_tokens(self, prompt: int, asked: int | None, param: str) -> int:
        context = self.model.spec.context_length
        if prompt >= context:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens, but the {param} "
                f"take {prompt} tokens", param=param)
        room = context - prompt
        if asked is not None and asked > room:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens; the {param} take "
                f"{prompt} and max_tokens asks for {asked} more", param="max_tokens")
        kv_room = self.pool.largest_sequence - prompt
        if kv_room < 1 or (asked is not None and asked > kv_room):
            raise InvalidInput(
                f"the {param} ({prompt} tokens) and max_tokens need more KV cache than this "
                f"server's budget of {self.pool.budget_bytes // 2**20} MiB holds "
                f"({self.pool.largest_sequence} tokens for this model); ask for fewer tokens, "
                "or raise --kv-budget", param="max_tokens" if kv_room >= 1 else param)
        return asked if asked is not None else \
            min(room, kv_room, self._default_max_tokens or room)

    def _check_queue(self) -> None:
        """Refuse when the queue is full, counting requests whose grammar waits to compile
        or compiles: a flood of costly schemas is refused before any compile."""
        waiting = len(self._waiting) + self._compiles
        if waiting >= self._max_waiting:
            raise Overloaded(f"model {self.model_id} has {waiting} requests waiting; "
                             "retry later", retry_after_s=1.0)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop. Runs until cancelled; then fails whatever is still queued.

        Use `await task_group.start(engine.run)`: it returns once the engine takes requests.
        """
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        task_status.started()
        try:
            while True:
                self._admit()
                if not self._rows:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                self._arrival.clear()
                await anyio.to_thread.run_sync(self._round, limiter=self._device)
        finally:
            self._accepting = False
            for gen in {id(c.generation): c.generation for c in self._rows}.values():
                self._close(gen, "failed", BackendUnavailable("the server is shutting down"))
            for gen in self._waiting:
                self._close(gen, "failed", BackendUnavailable("the server is shutting down"))
            self._rows.clear()
            self._waiting.clear()

    def stop_all(self, error: InferenceError) -> None:
        """End every generation at its next step, telling each consumer `error`; refuse new
        ones. For shutdown, after the grace period."""
        self._accepting = False
        for choice in self._rows:
            choice.generation.stop_error = error
            choice.generation.cancelled = True
        while self._waiting:
            self._close(self._waiting.popleft(), "failed", error)
        self._arrival.set()  # end the current round at its next step

    def _admit(self) -> None:
        """Event loop, between rounds: move waiting generations into the pool while they fit,
        oldest first."""
        while self._waiting:
            gen = self._waiting[0]
            if gen.cancelled:  # client left while queued: it never costs compute
                self._waiting.popleft()
                self._close(gen, "cancelled", gen.stop_error)
                continue
            if not self.pool.fits([c.reservation for c in gen.choices]):
                return  # it waits for room; later ones wait behind it (no starvation)
            self._waiting.popleft()
            gen.admitted_at = time.monotonic()
            for choice in gen.choices:
                choice.row = self.pool.add(choice.reservation)
                self._rows.append(choice)

    # --- the device thread ---------------------------------------------------------------

    def _round(self) -> None:
        """Device thread: prefill chunks and decode steps until the round ends."""
        deadline = time.monotonic() + self._round_s
        try:
            while not self._arrival.is_set() and time.monotonic() < deadline:
                self._release()
                if not self._rows:
                    return
                self.cache.settle(self.pool, self._rows)
                self._prefill_slice()
                stepped = any(c.state == "decode" for c in self._rows) and self._decode()
                if not stepped and not any(c.state == "prefill" for c in self._rows):
                    # every generating row is paused: wait for a reader, or an arrival
                    self._flush()
                    self._arrival.wait(PAUSED_POLL_S)
        finally:
            self._flush()

    def _release(self) -> None:
        """Free the rows of finished and cancelled choices (compacting the pool); their
        prompts' KV stays as prompt-cache entries."""
        for row in range(len(self._rows) - 1, -1, -1):
            choice = self._rows[row]
            gen = choice.generation
            if choice.state != "done" and not gen.cancelled:
                continue
            if not choice.failed:
                self.cache.keep(self.pool, len(self._rows), choice.prompt, row,
                                choice.generation.cache_scope)
            moved = self.pool.remove(row)
            if moved is not None:
                self._rows[row] = self._rows[moved]
                self._rows[row].row = row
            self._rows.pop()
            choice.state = "done"
            if gen.cancelled and gen.finished:
                self._post(self._close, gen, "cancelled", gen.stop_error)
        if not self._rows and not self.cache.entries:
            self.pool.free()
        else:  # rows no sequence and no entry holds give their pages back
            self.pool.trim({e.row for e in self.cache.entries})

    def _prefill_slice(self) -> None:
        """Prefill chunks, oldest sequence first, for up to `PREFILL_SLICE_S` between two
        decode steps (at least one chunk): short prompts arriving together all start within a
        few steps, while a long prompt still costs running streams one chunk per step."""
        started = time.perf_counter()
        while True:
            reading = next((c for c in self._rows if c.state == "prefill"), None)
            if reading is None:
                return
            self._prefill(reading)
            if time.perf_counter() - started >= PREFILL_SLICE_S:
                return

    def _prefill(self, choice: Choice) -> None:
        gen = choice.generation
        ids = choice.next_chunk(self._prefill_chunk)
        try:
            started = time.perf_counter()
            logits = self.model.prefill(self.pool, choice.row, ids, before_run=self._flush)
            self._observe("prefill", 1, len(ids), started)
        except Exception as exc:
            log.exception("prefill failed on %s", self.model_id)
            self._fail(gen, exc)
            return
        if not choice.prompt_done:
            return
        siblings = choice.siblings()
        for other in siblings:  # n > 1: the prompt is read once, then copied
            self.pool.copy(choice.row, other.row, len(choice.prompt))
        for each in (choice, *siblings):
            self._emit(each, each.advance(logits, None if each.matcher is None
                                          else each.matcher.first))

    def _decode(self) -> bool:
        """One decode run for every generating row whose consumer keeps up; False when there
        was none to step."""
        rows = self._rows
        width = 1 + max(r for r, c in enumerate(rows) if c.state == "decode")
        tokens = [c.last if c.state == "decode" and not self._paused(c.generation) else None
                  for c in rows[:width]]
        if all(t is None for t in tokens):
            return False
        try:
            started = time.perf_counter()
            logits = self.model.decode(self.pool, tokens, before_run=self._flush)
            stepped = sum(t is not None for t in tokens)
            self._observe("decode", stepped, stepped, started)
        except Exception as exc:
            log.exception("decode step failed on %s", self.model_id)
            for c in rows[:width]:
                if c.state == "decode":
                    self._fail(c.generation, exc)
            return True
        self.stats.decode_rows_total += stepped
        masks = self._masks([c for row, c in enumerate(rows[:width])
                             if tokens[row] is not None and c.matcher is not None])
        for row, choice in enumerate(rows[:width]):
            if tokens[row] is not None and not choice.generation.cancelled:
                self._emit(choice, choice.advance(logits[row], masks.get(id(choice))))
        return True

    def _paused(self, gen: Generation) -> bool:
        """Whether `gen`'s consumer is too far behind to step it now; cancels it once it has
        been so for `stall_s`."""
        if gen.emitted - gen.received < UNREAD_PER_CHOICE * len(gen.choices):
            gen.paused_at = None
            return False
        now = time.monotonic()
        if gen.paused_at is None:
            gen.paused_at = now
            self.stats.paused_total += 1
        elif now - gen.paused_at > self._stall_s and not gen.cancelled:
            log.warning("%s: a consumer read nothing for %.0f s; its generation is cancelled",
                        self.model_id, self._stall_s)
            self.stats.stalled_total += 1
            gen.cancelled = True  # released at the next step
        return True

    def _masks(self, guided: list[Choice]) -> dict[int, npt.NDArray[np.bool_]]:
        """The grammar masks of a step's constrained choices, filled in parallel."""
        if not guided:
            return {}
        started = time.perf_counter()
        matchers = [c.matcher.matcher for c in guided if c.matcher is not None]
        allowed = self.model.guide.fill(matchers)
        self._observe("mask", len(guided), len(guided), started)
        return {id(c): allowed[i] for i, c in enumerate(guided)}

    def _observe(self, kind: str, rows: int, tokens: int, started: float) -> None:
        if kind == "prefill":
            self.stats.prefill_runs_total += 1
        elif kind == "decode":
            self.stats.decode_runs_total += 1
        if self.on_run is not None:
            self.on_run(kind, rows, tokens, time.perf_counter() - started)

    def _emit(self, choice: Choice, delta: ChatDelta) -> None:
        gen = choice.generation
        gen.emitted += 1
        self._post(self._deliver, gen, delta)
        if delta.finish_reason is not None and gen.finished:
            self._post(self._close, gen, "completed", None)

    def _fail(self, gen: Generation, exc: Exception) -> None:
        for choice in gen.choices:
            choice.state = "done"
            choice.failed = True  # its row may hold half a run: never kept
        self._post(self._close, gen, "failed", BackendUnavailable(f"inference failed: {exc}"))

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        """Queue an event-loop call; `_flush` sends a step's calls in one wake-up (one per
        delta cost the event loop, and the cores onnxruntime shares with it, more), as the
        next model run starts (the model calls it) or when the round ends."""
        self._posted.append((callback, args))

    def _flush(self) -> None:
        if self._posted:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_call_all, self._posted)
            self._posted = []

    # --- the event loop ------------------------------------------------------------------

    def _deliver(self, gen: Generation, delta: ChatDelta) -> None:
        """Hand one delta to the consumer."""
        self.stats.generated_tokens_total += 1
        if gen.ended:
            return
        try:
            gen.send.send_nowait(delta)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
            gen.cancelled = True  # the consumer is gone: the next step drops the generation

    def _close(self, gen: Generation, outcome: str, error: InferenceError | None) -> None:
        """End a generation's stream once, telling the consumer `error` if there is one."""
        if gen.ended:
            return
        gen.ended = True
        gen.cancelled = gen.cancelled or outcome != "completed"
        if error is not None:
            try:
                gen.send.send_nowait(error)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
                pass
        gen.send.close()
        if outcome == "cancelled":
            self.stats.cancelled_total += 1
        elif outcome == "failed":
            self.stats.failed_total += 1
        else:
            self.stats.completed_total += 1


def _call_all(calls: list[tuple[Callable[..., None], tuple[object, ...]]]) -> None:
    for callback, args in calls:
        callback(*args)
