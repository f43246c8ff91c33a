"""The embedding micro-batcher: merges inputs of concurrent requests into device batches.

The batching rule, in one place:
- Inputs queue in a bounded buffer; a request that would overflow it is refused whole
  (`Overloaded`). The queue is in arrival order within a tenant (the API key's scope) and
  interleaved across tenants, input by input (fair queuing on a virtual clock: each input's
  place is its tenant's previous place, or the head's if later, plus 1/weight). So one tenant's
  thousand inputs do not hold another's single input behind them: it runs within a batch or
  two.
- When the device is free, the batcher looks at the oldest `window` inputs, sorts them by
  length, and cuts the batch that contains the oldest input, growing it with its neighbours in
  length while padded tokens (longest x count) stay within `max_batch_tokens` and the count
  within `max_batch_size`, and while each neighbour costs less in the batch than in a run of
  its own: the padding it adds (the padded tokens it brings beyond its own) must not exceed
  `run_cost_tokens`, the fixed cost of a model run counted in padded tokens. Measured on
  all-MiniLM-L6-v2 with 2 CPU threads (benchmarks/embeddings.py): a run costs about
  1.4 ms plus 0.09 ms per padded token, so 16 tokens. Padding is compute thrown away, and on
  a CPU it costs what real tokens cost: batches grown past that bound ran fewer texts per
  second, not more.
- The input at the head of the queue always runs next, so nothing starves. No timer: inputs
  that arrive while a batch runs gather for the next one (with a fast client, 21 of 32
  concurrent requests were queued at each cut; with a Python client, 9: the client, not the
  batcher, was the limit).
- Inputs of a request whose caller has gone are dropped before they cost compute.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from inference.embed.model import EmbeddingModel, Vector
from inference.errors import BackendUnavailable, InferenceError, Overloaded
from inference.limits import EmbeddingLimits

log = logging.getLogger(__name__)
INLINE_CHARS = 2048  # texts up to this many characters in all tokenize on the event loop
RUN_COST_TOKENS = 16  # a model run's fixed cost, in padded tokens (see the rule above)


@dataclass
class BatcherStats:
    """Monotonic counters, for /health and metrics."""

    requests_total: int = 0
    inputs_total: int = 0
    tokens_total: int = 0
    model_runs_total: int = 0
    padded_tokens_total: int = 0
    cancelled_inputs_total: int = 0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    # why batches are the size they are (benchmarks/embeddings.py reads these)
    queue_depth_total: int = 0  # inputs queued when each batch was cut, summed
    padding_refusals_total: int = 0  # neighbours left out by the padding rule


class _Job:
    """One request's inputs and results."""

    def __init__(self, count: int) -> None:
        self.results: list[Vector | None] = [None] * count
        self.remaining = count
        self.cancelled = False
        self.error: InferenceError | None = None
        self.done = anyio.Event()

    def put(self, index: int, vector: Vector) -> None:
        self.results[index] = vector
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: InferenceError) -> None:
        if self.error is None:
            self.error = error
        self.done.set()


@dataclass(order=True)
class _Item:
    # ordered by length, then place: a batch grows by neighbours in length, the earliest
    # placed first
    length: int
    place: float  # its place on the fair queue's virtual clock
    seq: int
    job: _Job = field(compare=False)
    index: int = field(compare=False)
    ids: Sequence[int] = field(compare=False)


class EmbeddingBatcher:
    """Serves `embed()` calls from one `EmbeddingModel`. Call `run()` in a task group first."""

    def __init__(self, model: EmbeddingModel, limits: EmbeddingLimits | None = None, *,
                 run_cost_tokens: int = RUN_COST_TOKENS, window: int | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """`limits`: the server's (`Settings.limits().embedding`); their defaults otherwise."""
        limits = limits or EmbeddingLimits()
        self.model = model
        self.model_id = model.spec.model_id
        self.stats = BatcherStats()
        self.max_batch_size = max(1, limits.max_batch_size)
        self.max_batch_tokens = max(limits.max_batch_tokens, model.spec.max_length)
        self._max_queued = limits.max_queued_inputs
        self._run_cost = run_cost_tokens
        self.on_batch = on_batch  # (inputs, padded tokens, seconds), for metrics
        self._window = window or 8 * self.max_batch_size
        self._queue: deque[_Item] = deque()  # by place: fair between tenants
        self._seq = 0
        self._last_place: dict[str, float] = {}  # tenant -> the place of its last input
        self._clock = 0.0  # the latest place cut into a batch
        self._wakeup = anyio.Event()
        self._running = False
        self._busy = False
        self._device = anyio.CapacityLimiter(1)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- what the server needs of a model, without reaching into it ----------------------

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def dimension(self) -> int:
        return self.model.spec.dimension

    @property
    def matryoshka(self) -> bool:
        """The model's vectors may be shortened (`dimensions`)."""
        return self.model.spec.matryoshka

    def device_info(self) -> dict[str, Any]:
        """Where runs happen, for /health and /v1/models."""
        session = self.model.session
        return {"runs_by_provider": dict(session.runs_by_provider),
                "qnn_device": session.qnn_kind, "qnn_buckets": session.placement,
                "fallback_reason": session.fallback_reason, "note": session.note}

    def check_token_lists(self, lists: Sequence[object]) -> None:
        """Refuse token-id inputs longer than the model reads, before full validation."""
        for i, ids in enumerate(lists):
            if isinstance(ids, list):
                self.model.check_length(ids, i)

    async def tokenize(self, items: Sequence[tuple[int, str | Sequence[int]]]
                       ) -> list[list[int]]:
        """Token ids for (request index, text or token ids) pairs, each checked against the
        model's limits (errors name the request's index)."""
        texts = [(i, x) for i, x in items if isinstance(x, str)]
        for i, text in texts:
            self.model.check_text_size(text, i)
        ids: dict[int, list[int]] = {}
        if texts:
            # Short inputs tokenize faster than a thread hop costs; long ones leave the loop.
            words = [t for _, t in texts]
            encoded = (self.model.tokenize(words) if sum(map(len, words)) <= INLINE_CHARS
                       else await anyio.to_thread.run_sync(self.model.tokenize, words))
            ids.update(zip((i for i, _ in texts), encoded, strict=True))
        for i, x in items:
            if not isinstance(x, str):
                ids[i] = self.model.wrap_ids(x)
            self.model.check_length(ids[i], i)
        return [ids[i] for i, _ in items]

    async def embed(self, inputs: Sequence[Sequence[int]], tenant: str = "",
                    weight: float = 1.0) -> list[Vector]:
        """Embed token-id lists (already wrapped and length-checked); results in input order.
        `tenant` (the API key's scope) places them fairly among other tenants' inputs, with
        `weight` its share (each input advances its place by 1/weight).

        Raises `Overloaded` if the queue cannot take every input. Cancelling the caller drops
        its inputs that have not run yet."""
        if not self._running:
            raise BackendUnavailable(f"model {self.model_id} is not running")
        if len(self._queue) + len(inputs) > self._max_queued:
            raise Overloaded(f"model {self.model_id} has {len(self._queue)} inputs queued; "
                             "retry later", retry_after_s=1.0)
        job = _Job(len(inputs))
        head = self._queue[0].place if self._queue else self._clock
        place = max(head, self._last_place.get(tenant, 0.0))
        items = []
        for index, ids in enumerate(inputs):
            self._seq += 1
            place += 1.0 / max(weight, 1e-6)
            items.append(_Item(len(ids), place, self._seq, job, index, ids))
        self._last_place[tenant] = place
        self._enqueue(items)
        self.stats.requests_total += 1
        self.stats.inputs_total += len(inputs)
        self.stats.tokens_total += sum(len(ids) for ids in inputs)
        self._wakeup.set()
        try:
            await job.done.wait()
        except BaseException:
            job.cancelled = True
            raise
        if job.error is not None:
            raise job.error
        return [v for v in job.results if v is not None]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The batching loop. Runs until cancelled; then fails whatever is still queued."""
        self._running = True
        task_status.started()
        try:
            while True:
                batch = self._next_batch()
                if not batch:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                self._busy = True
                try:
                    await self._run_batch(batch)
                finally:
                    self._busy = False
        finally:
            self._running = False
            for item in self._queue:
                item.job.fail(BackendUnavailable("the server is shutting down"))
            self._queue.clear()

    def _enqueue(self, items: list[_Item]) -> None:
        """Insert `items` (in place order) where their places put them: after every queued
        input of an earlier or equal place."""
        if not self._queue or self._queue[-1].place <= items[0].place:
            self._queue.extend(items)  # the usual case: one tenant, or a tenant's turn is last
            return
        merged = list(self._queue)
        at = bisect.bisect_right([item.place for item in merged], items[0].place)
        tail = merged[at:]
        merged = merged[:at]
        i = j = 0
        while i < len(tail) or j < len(items):
            if j == len(items) or (i < len(tail) and tail[i].place <= items[j].place):
                merged.append(tail[i])
                i += 1
            else:
                merged.append(items[j])
                j += 1
        self._queue = deque(merged)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def stop_all(self, error: InferenceError) -> None:
        """Fail everything still queued with `error` and refuse new work (shutdown)."""
        self._running = False
        while self._queue:
            self._queue.popleft().job.fail(error)

    def _next_batch(self) -> list[_Item]:
        while self._queue and self._queue[0].job.cancelled:
            self._drop(self._queue.popleft())
        if not self._queue:
            return []
        self.stats.queue_depth_total += len(self._queue)
        window = sorted(self._queue[i] for i in range(min(self._window, len(self._queue))))
        oldest = self._queue[0]
        lo = hi = window.index(oldest)
        longest = oldest.length
        while hi - lo + 1 < self.max_batch_size:
            left = window[lo - 1] if lo > 0 else None
            right = window[hi + 1] if hi + 1 < len(window) else None
            # grow towards the neighbour closest in length; ties go to the shorter one
            options = sorted((c for c in (left, right) if c is not None),
                             key=lambda c: abs(c.length - oldest.length))
            grown = False
            count = hi - lo + 1
            for cand in options:
                wider = max(longest, cand.length)
                padded = wider * (count + 1)
                waste = padded - longest * count - cand.length  # padding it brings
                if padded <= self.max_batch_tokens and waste <= self._run_cost:
                    longest = wider
                    if cand is left:
                        lo -= 1
                    else:
                        hi += 1
                    grown = True
                    break
            if not grown:
                if options:
                    self.stats.padding_refusals_total += 1
                break
        batch = window[lo : hi + 1]
        self._clock = max(self._clock, *(item.place for item in batch))
        chosen = {id(item) for item in batch}
        self._queue = deque(item for item in self._queue if id(item) not in chosen)
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.job.cancelled]
        for item in batch:
            if item.job.cancelled:
                self._drop(item)
        if not live:
            return
        started = time.perf_counter()
        try:
            vectors = await anyio.to_thread.run_sync(self.model.embed_batch,
                                                     [item.ids for item in live],
                                                     limiter=self._device)
        except Exception as exc:
            log.exception("embedding batch failed on %s", self.model_id)
            for item in live:
                item.job.fail(BackendUnavailable(f"inference failed: {exc}"))
            return
        self.stats.model_runs_total += 1
        self.stats.last_batch_size = len(live)
        width = max(item.length for item in live)
        self.stats.last_batch_tokens = width * len(live)
        self.stats.padded_tokens_total += width * len(live)
        if self.on_batch is not None:
            self.on_batch(len(live), width * len(live), time.perf_counter() - started)
        for item, vector in zip(live, vectors, strict=True):
            item.job.put(item.index, vector)

    def _drop(self, item: _Item) -> None:
        self.stats.cancelled_inputs_total += 1

