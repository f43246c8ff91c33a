"""The decode scheduler of one chat model: continuous batching over a shared KV pool.

Requests wait in a bounded queue and join when the pool has room for them (a row per choice,
and their reserved tokens). On the device thread, off the event loop, each iteration runs at
most one prefill chunk (for the oldest sequence still reading its prompt) and one decode step
for every sequence that is generating: a single model run for all of them. A sequence joins
the decode batch at the step after its prefill, and leaves (freeing its row at once) when it
finishes, is cancelled, or its consumer goes away.

Prefill runs in chunks, so a long prompt stalls running streams for one chunk at a time and a
consumer that leaves stops its prefill at the next chunk. While no stream decodes, nobody waits
on a chunk, and prefill runs in larger ones (`prefill_chunk_idle`): fewer runs, faster. Chunk
boundaries do not change the numbers (on the default build, logits after a 1,500-token prompt
read in chunks of 64 to 1,500 tokens were bitwise equal: docs/decisions/0006-prefill.md), so a
sequence's output still does not depend on its batch mates; tests hold it to that.

A consumer that stops reading (a slow or stalled client, over SSE or the WebSocket alike)
pauses its generation: past `ChatLimits.unread_per_choice` undelivered deltas per choice it
keeps its row but is not stepped, and it resumes once its consumer catches up. Paused for
`stall_s`, it is cancelled. So a client that never reads costs a bounded number of tokens, not
`max_tokens`.

Ownership: one thread owns the batch state. The device thread (the worker `run()` hands each
turn of rounds to, one at a time) alone reads and writes the running rows, the queue of
generations waiting for room, the KV pool, the prompt cache and every `Choice`. The event loop
reaches them only by commands, which the device thread drains at the top of each round:
submit a generation, cancel one (its consumer closed the stream or went away), stop all
(shutdown). What a round produces (deltas, admissions, ends) goes the other way as event-loop
calls, handed over in one batch: just before the round's model run, and when the turn ends.
The event loop owns what consumers see (each generation's stream and its end), admission
control and the counts of queued and running generations. Two kinds of plain counters cross,
each with one writer: `Generation.received` (the consumer's, which the device thread reads to
pause a generation whose reader fell behind) and `EngineStats`. Reports (`kv_usage`,
`cache_stats`) read the pool's and the cache's counters as they stand. Between turns, and after
the last one, no round runs, and `run()` owns the state: it fails what is left at shutdown.
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
from inference.chat.model import ChatModel, PreparedRun
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
from inference.fair import FairQueue
from inference.limits import ChatLimits

__all__ = ["ChatDelta", "ChatEngine", "Constraint", "DeltaStream", "EngineStats",
           "GenerationStream"]
log = logging.getLogger(__name__)
PREFILL_SLICE_S = 0.1  # prefill time between two decode steps, beyond the first chunk
PAUSED_POLL_S = 0.02  # how often a round whose rows all wait looks for a reader
# Per model run: "prefill" or "decode", rows in the run, new tokens, seconds; and per step
# with constrained rows, "mask", the rows whose grammar masks were filled, and the seconds
# that took. Called on the device thread.
RunObserver = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class _Submit:
    gen: Generation


@dataclass(frozen=True)
class _Cancel:
    gen: Generation
    error: InferenceError | None = None


@dataclass(frozen=True)
class _StopAll:
    error: InferenceError


Command = _Submit | _Cancel | _StopAll


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

    A round, on the device thread: drain the commands, free finished rows, admit what
    fits, run a prefill slice and one decode step. Rounds run in turns, each handed to a
    worker thread, which end when nothing runs or after `round_s` (so shutdown never waits
    long). Every delta is posted to the event loop without waiting for it, so per-token HTTP
    work never sits between two steps. Runs on asyncio (which Quart and Hypercorn use).
    """

    def __init__(self, model: ChatModel, limits: ChatLimits | None = None, *,
                 on_run: RunObserver | None = None) -> None:
        """`limits`: the server's (`Settings.limits().chat`); their defaults otherwise."""
        self.model = model
        self.model_id = model.spec.model_id
        self.limits = limits = limits or ChatLimits()
        self.stats = EngineStats()
        self.pool = KVPool(model.kv_layout(), budget_bytes=limits.kv_budget_bytes,
                           max_rows=limits.max_running,
                           spare_rows=limits.max_running if limits.prompt_cache else 0)
        self.cache = PromptCache(
            chunk=limits.prefill_chunk, enabled=limits.prompt_cache,
            max_tokens=limits.prompt_cache_bytes // self.pool.layout.bytes_per_token)
        self.on_run = on_run
        # The device thread's: the running choices (choice i holds pool row i), and the
        # generations waiting for room
        self._rows: list[Choice] = []
        # waiting generations by tenant (cache scope), admitted round-robin (inference/fair.py)
        self._waiting: FairQueue[Generation] = FairQueue(lambda gen: gen.cache_scope,
                                                          lambda gen: gen.weight)
        self._tenants_seen: dict[str, float] = {}  # tenant -> when it last sent work
        self._posted: list[tuple[Callable[..., None], tuple[object, ...]]] = []
        self._busy = False  # the last turn left rows running or waiting
        self._held_told = False  # what the event loop was last told of `_held`
        # Commands from the event loop (deque appends and pops are atomic)
        self._inbox: deque[Command] = deque()
        self._commanded = threading.Event()  # wakes a round that waits for a reader
        # The event loop's: generations submitted and not yet admitted (by id, in order, with
        # their choices), and the running ones and their choices
        self._queued: dict[Generation, int] = {}
        self._running = 0
        self._running_choices = 0
        self._held = False  # the device thread holds a generation back for room
        self._device = anyio.CapacityLimiter(1)
        # Grammars compile one at a time per model, in a worker thread: a compile cannot be
        # stopped once it runs, so a request still waiting here when its client leaves costs
        # nothing, and one compiling costs at most schema_check's budget.
        self._compiling = anyio.CapacityLimiter(1)
        self._compiles = 0  # requests waiting for or in a compile: they count as waiting
        self._wakeup = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
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
        """Generations admitted and not yet ended."""
        return self._running

    @property
    def waiting(self) -> int:
        """Generations that wait for room (see `_queue_depth`)."""
        return self._queue_depth()

    @property
    def idle(self) -> bool:
        return not self._queued and not self._running

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids (special tokens kept, as a prompt holds them)."""
        return str(self.model.tokenizer.decode(token_ids, skip_special_tokens=False))

    def kv_usage(self) -> dict[str, int]:
        """The KV pool's budget, allocation and use, for /health and /metrics."""
        return self.pool.describe()

    @property
    def batch_invariant(self) -> bool:
        """Whether a sequence decoded alone gets the same logits as batched (what seeded
        sampling promises: docs/decisions/0001)."""
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
                    cache_scope: str = "", weight: float = 1.0) -> GenerationStream:
        """Queue a chat generation of `n` choices, each following `grammar` if one is given.
        `tools` go to templates that read them. Only prompt-cache entries of `cache_scope` are
        reused; `cache_scope` is also its tenant in the fair queue, where `weight` is its
        share. Raises before anything streams if it cannot be served."""
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
                             cache_scope=cache_scope, weight=weight)

    async def start_completion(self, prompts: list[str] | list[list[int]],
                               params: SamplingParams, *, n: int = 1,
                               cache_scope: str = "", weight: float = 1.0
                               ) -> GenerationStream:
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
        return self._enqueue(ids, params, n, param="prompt", cache_scope=cache_scope,
                             weight=weight)

    def check_prompt_shape(self, prompts: int, id_lengths: list[int]) -> None:
        """Cheap checks before a request is validated in full: no more prompts than decode
        slots, no token-id prompt longer than the context."""
        if prompts > self.limits.max_running:
            raise InvalidInput(f"{prompts} prompts need {prompts} decode slots; this server "
                               f"runs at most {self.limits.max_running} per model", param="prompt")
        context = self.model.spec.context_length
        for length in id_lengths:
            if length >= context:
                raise ContextTooLong(f"this model's maximum context length is {context} "
                                     f"tokens, but a prompt has {length}", param="prompt")

    def _check_start(self, params: SamplingParams, choices: int) -> None:
        if not self._accepting:
            raise BackendUnavailable(f"model {self.model_id} is not running")
        if choices > self.limits.max_running:
            raise InvalidInput(f"{choices} choices need {choices} decode slots; this server "
                               f"runs at most {self.limits.max_running} per model", param="n")
        for token, _ in params.logit_bias:
            if token >= self.model.vocab_size:
                raise InvalidInput(f"logit_bias names token {token}; this model's vocabulary "
                                   f"has {self.model.vocab_size} tokens", param="logit_bias")
        self._check_queue()  # before tokenizing: an overloaded server refuses cheaply

    def _enqueue(self, prompts: list[list[int]], params: SamplingParams, n: int, *,
                 param: str, matchers: list[Matcher] | None = None,
                 cache_scope: str = "", weight: float = 1.0) -> GenerationStream:
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
        gen.weight = weight
        self._queued[gen] = len(gen.choices)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += gen.prompt_tokens
        self._command(_Submit(gen))
        return GenerationStream(gen, receive, self.cancel)

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
            min(room, kv_room, self.limits.max_tokens_limit)

    def _check_queue(self) -> None:
        """Refuse when the queue is full, counting requests whose grammar waits to compile
        or compiles: a flood of costly schemas is refused before any compile."""
        waiting = self._queue_depth() + self._compiles
        if waiting >= self.limits.max_waiting:
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
                if not self._inbox and not self._busy:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                # not abandoned when cancelled: a turn always ends before this returns
                await anyio.to_thread.run_sync(self._turn, limiter=self._device)
        finally:
            # no turn runs now, and none will: the state is this task's
            self._accepting = False
            error = BackendUnavailable("the server is shutting down")
            gens = {id(c.generation): c.generation for c in self._rows}
            gens.update((id(g), g) for g in self._waiting)
            gens.update((id(c.gen), c.gen) for c in self._inbox if isinstance(c, _Submit))
            for gen in gens.values():
                self._close(gen, "failed", error)
            self._rows.clear()
            self._waiting.clear()
            self._inbox.clear()

    def cancel(self, gen: Generation, error: InferenceError | None = None) -> None:
        """Event loop: stop `gen` at its next step (its consumer closed the stream or left),
        telling the consumer `error` if one is given."""
        if not gen.ended:
            self._command(_Cancel(gen, error))

    def stop_all(self, error: InferenceError) -> None:
        """Event loop: end every generation at its next step, telling each consumer `error`;
        refuse new ones. For shutdown, after the grace period."""
        self._accepting = False
        self._command(_StopAll(error))

    def _command(self, command: Command) -> None:
        self._inbox.append(command)
        self._commanded.set()  # a round waiting for a reader reads it now
        self._wakeup.set()  # an idle run() starts a turn

    def _queue_depth(self) -> int:
        """The generations that wait, as the event loop sees them: every one submitted and
        not yet admitted once the device thread holds one back for room (they queue behind
        it); else those beyond the rows the running ones leave free (the others are admitted
        at the device thread's next round)."""
        if self._held:
            return len(self._queued)
        free = self.limits.max_running - self._running_choices
        depth = 0
        for choices in self._queued.values():
            if depth or choices > free:
                depth += 1
            else:
                free -= choices
        return depth

    def _holding(self, held: bool) -> None:
        """Event loop: whether the device thread holds a generation back for room."""
        self._held = held

    def _started(self, gen: Generation, at: float) -> None:
        """Event loop: the device thread admitted `gen`."""
        if not gen.ended:
            gen.admitted_at = at
            del self._queued[gen]
            self._running += 1
            self._running_choices += len(gen.choices)

    # --- the device thread ---------------------------------------------------------------

    def _turn(self) -> None:
        """Device thread: rounds until nothing runs or `round_s` has passed."""
        deadline = time.monotonic() + self.limits.round_s
        try:
            while True:
                self._commanded.clear()
                self._drain()
                self._release()
                self._admit()
                if not self._rows:
                    return
                self._round()
                if time.monotonic() >= deadline:
                    return
        finally:
            self._busy = bool(self._rows or self._waiting)
            self._flush()

    def _drain(self) -> None:
        """Carry out the event loop's commands, in order."""
        while self._inbox:
            command = self._inbox.popleft()
            if isinstance(command, _Submit):
                self._waiting.append(command.gen)
                self._tenants_seen[command.gen.cache_scope] = time.monotonic()
            elif isinstance(command, _Cancel):
                if not command.gen.cancelled:
                    command.gen.cancelled = True
                    command.gen.stop_error = command.error
            else:  # stop all: the running end at their next step, the waiting now
                for choice in self._rows:
                    choice.generation.cancelled = True
                    choice.generation.stop_error = command.error
                while self._waiting:
                    self._post(self._close, self._waiting.drop(), "failed", command.error)

    def _admit(self) -> None:
        """Move waiting generations into the pool while they fit: each tenant's oldest in
        turn, so a tenant's flood cannot hold another's request back for more than a turn;
        and while other tenants are active, no tenant takes the rows kept for them."""
        while self._waiting:
            tenant, gen = next(((t, g) for t, g in self._waiting.heads()
                                if g.cancelled or self._may_take(t, len(g.choices))),
                               (None, None))
            if tenant is None or gen is None:
                break  # every waiting tenant is at its share: the kept rows wait for others
            if gen.cancelled:  # client left while queued: it never costs compute
                self._waiting.drop(tenant)
                self._post(self._close, gen, "cancelled", gen.stop_error)
                continue
            if not self.pool.fits([c.reservation for c in gen.choices]):
                break  # it waits for room; later ones wait behind it (no starvation)
            self._waiting.pop(tenant)
            for choice in gen.choices:
                choice.row = self.pool.add(choice.reservation)
                self._rows.append(choice)
            self._post(self._started, gen, time.monotonic())
        if bool(self._waiting) != self._held_told:
            self._held_told = bool(self._waiting)
            self._post(self._holding, self._held_told)

    def _may_take(self, tenant: str, rows: int) -> bool:
        """Whether `tenant` may take `rows` more rows: all of them while it is the only
        tenant active within `tenant_window_s`, else up to `max_running` less the rows kept
        for the others (`tenant_reserve_rows`)."""
        limits = self.limits
        now = time.monotonic()
        for other, seen in list(self._tenants_seen.items()):
            if now - seen > limits.tenant_window_s:
                del self._tenants_seen[other]
        if len(self._tenants_seen) <= 1:
            return True
        held = sum(1 for c in self._rows if c.generation.cache_scope == tenant)  # a row each
        return held + rows <= max(1, limits.max_running - limits.tenant_reserve_rows)

    def _round(self) -> None:
        """The round's runs: a prefill slice and a decode step. When every row waits for
        its reader, it waits a moment for one (or for a command) instead."""
        for choice, cached in self.cache.settle(self.pool, self._rows):
            choice.start_at(cached)
        self._prefill_slice()
        stepped = any(c.state == "decode" for c in self._rows) and self._decode()
        if not stepped and not any(c.state == "prefill" for c in self._rows):
            self._flush()
            self._commanded.wait(PAUSED_POLL_S)

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
        decoding = any(c.state == "decode" for c in self._rows)
        ids = choice.next_chunk(self.limits.prefill_chunk if decoding
                                else self.limits.prefill_chunk_idle)
        try:
            started = time.perf_counter()
            logits = self._run(self.model.prepare_prefill(self.pool, choice.row, ids))
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
            logits = self._run(self.model.prepare_decode(self.pool, tokens))
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

    def _run(self, run: PreparedRun) -> npt.NDArray[np.float32]:
        """One model run, the event loop woken with the last runs' calls just before it:
        waking it hands the GIL over, and the run gives the GIL up anyway, so the device
        thread does not wait for the loop's work before it starts the run."""
        self._flush()
        return run()

    def _paused(self, gen: Generation) -> bool:
        """Whether `gen`'s consumer is too far behind to step it now; cancels it once it has
        been so for `stall_s`."""
        if gen.emitted - gen.received < self.limits.unread_per_choice * len(gen.choices):
            gen.paused_at = None
            return False
        now = time.monotonic()
        if gen.paused_at is None:
            gen.paused_at = now
            self.stats.paused_total += 1
        elif now - gen.paused_at > self.limits.stall_s and not gen.cancelled:
            log.warning("%s: a consumer read nothing for %.0f s; its generation is cancelled",
                        self.model_id, self.limits.stall_s)
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
        """Queue an event-loop call; `_flush` sends a round's calls in one wake-up (one per
        delta cost the event loop, and the cores onnxruntime shares with it, more), as the
        next model run starts or when the turn ends."""
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
            self.cancel(gen)  # the consumer is gone: the next round drops the generation

    def _close(self, gen: Generation, outcome: str, error: InferenceError | None) -> None:
        """End a generation's stream once, telling the consumer `error` if there is one."""
        if gen.ended:
            return
        gen.ended = True
        if gen.admitted_at is None:
            del self._queued[gen]
        else:
            self._running -= 1
            self._running_choices -= len(gen.choices)
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
