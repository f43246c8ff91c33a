"""Prometheus metrics (`GET /metrics`), with prometheus_client.

Latencies are observed where the server consumes a generation (`MeteredStream`), so SSE,
non-streamed and WebSocket chats are measured alike. Counters and gauges are read from the
engines' own stats at scrape time by one collector, so `inference/` needs no metrics library.
Names follow vLLM's and TEI's where they overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.chat.engine import ChatDelta, DeltaStream, GenerationStream
from inference.embed.cache import EmbeddingCache
from server.core.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
MAX_TENANT_LABELS = 256
MASK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    """Every metric npugate exports, in its own registry."""

    def __init__(self, models: ModelRegistry,
                 embedding_cache: EmbeddingCache | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("npugate_time_to_first_token_seconds",
                              "Request start to first generated token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("npugate_inter_token_latency_seconds",
                             "Gap between consecutive generated tokens", ["model"],
                             buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("npugate_e2e_request_latency_seconds",
                             "Request start to last token or error", ["model", "endpoint"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("npugate_request_queue_time_seconds",
                               "Time a request waited before its first decode step", ["model"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("npugate_embedding_batch_size", "Inputs per model run",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                    registry=r)
        self.batch_tokens = Histogram("npugate_embedding_batch_tokens",
                                      "Padded tokens per model run", ["model"],
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
                                      registry=r)
        self.batch_seconds = Histogram("npugate_embedding_batch_seconds",
                                       "Duration of one embedding model run", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.decode_batch = Histogram("npugate_decode_batch_size",
                                      "Sequences stepped by one chat decode run", ["model"],
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.chat_run_seconds = Histogram("npugate_chat_model_run_seconds",
                                          "Duration of one chat model run", ["model", "kind"],
                                          buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.prefill_tokens = Histogram("npugate_prefill_chunk_tokens",
                                        "Prompt tokens read by one prefill run", ["model"],
                                        buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024),
                                        registry=r)
        self.mask_seconds = Histogram("npugate_grammar_mask_seconds",
                                      "Time to compute one constrained sequence's token mask "
                                      "(a step's rows are filled together; this is the share "
                                      "of one)", ["model"], buckets=MASK_BUCKETS,
                                      registry=r)
        # Per tenant (API key): label values are the keys' names, at most MAX_TENANT_LABELS
        # of them (later ones count as "other")
        self._tenant_labels: set[str] = set()
        self.tenant_requests = Counter("npugate_tenant_requests",
                                       "API requests by tenant and outcome (2xx, 4xx, 429, "
                                       "5xx)", ["tenant", "outcome"], registry=r)
        self.tenant_tokens = Counter("npugate_tenant_tokens",
                                     "Chat and completion tokens by tenant: prompt (cached "
                                     "included), cached, generated", ["tenant", "kind"],
                                     registry=r)
        self.tenant_embedding_cache = Counter(
            "npugate_tenant_embedding_cache_lookups",
            "Embedding-cache lookups by tenant and result (hit, miss); a tenant sees only its "
            "scope's entries", ["tenant", "result"], registry=r)
        r.register(_EngineStats(models, embedding_cache))

    def tenant(self, name: str) -> str:
        """The label of a tenant's name: itself, unless too many are labelled already."""
        if name not in self._tenant_labels:
            if len(self._tenant_labels) >= MAX_TENANT_LABELS:
                return "other"
            self._tenant_labels.add(name)
        return name

    def count_request(self, tenant: str | None, status: int) -> None:
        """One API request's outcome; `tenant` None: it had no valid key."""
        outcome = "429" if status == HTTPStatus.TOO_MANY_REQUESTS else f"{status // 100}xx"
        self.tenant_requests.labels("unauthenticated" if tenant is None
                                    else self.tenant(tenant), outcome).inc()

    def count_embedding_cache(self, tenant: str, hits: int, misses: int) -> None:
        """One embedding request's cache lookups, by tenant (its scope's entries only)."""
        label = self.tenant(tenant)
        if hits:
            self.tenant_embedding_cache.labels(label, "hit").inc(hits)
        if misses:
            self.tenant_embedding_cache.labels(label, "miss").inc(misses)

    def embedding_batch_observer(self, model: str) -> BatchObserver:
        return BatchObserver(self, model)

    def chat_run_observer(self, model: str) -> ChatRunObserver:
        return ChatRunObserver(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BatchObserver:
    """The batcher's per-run callback for one model."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._size = metrics.batch_size.labels(model)
        self._tokens = metrics.batch_tokens.labels(model)
        self._seconds = metrics.batch_seconds.labels(model)

    def __call__(self, inputs: int, padded_tokens: int, seconds: float) -> None:
        self._size.observe(inputs)
        self._tokens.observe(padded_tokens)
        self._seconds.observe(seconds)


class ChatRunObserver:
    """The chat engine's per-run callback for one model (called on its device thread)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._batch = metrics.decode_batch.labels(model)
        self._prefill_tokens = metrics.prefill_tokens.labels(model)
        self._seconds = {kind: metrics.chat_run_seconds.labels(model, kind)
                         for kind in ("prefill", "decode")}
        self._mask = metrics.mask_seconds.labels(model)

    def __call__(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        if kind == "mask":  # grammar masks of `rows` sequences, not a model run
            for _ in range(rows):
                self._mask.observe(seconds / rows)
            return
        self._seconds[kind].observe(seconds)
        if kind == "decode":
            self._batch.observe(rows)
        else:
            self._prefill_tokens.observe(tokens)


class MeteredStream(DeltaStream):
    """A `GenerationStream` that records TTFT, inter-token, queue and end-to-end latency (the
    stream counts its usage itself). On close it tells `on_close` the tokens it used
    (prompt, cached, generated): the tenant's lease (`server.tenants.limits`)."""

    def __init__(self, stream: GenerationStream, metrics: Metrics, model: str,
                 endpoint: str, tenant: str = "open",
                 on_close: Callable[[int, int, int], None] | None = None) -> None:
        self._stream = stream
        self._m = metrics
        self._model = model
        self._endpoint = endpoint
        self._tenant = metrics.tenant(tenant)
        self._on_close = on_close
        self._started = time.perf_counter()
        self._last: float | None = None
        self._closed = False
        self.prompt_tokens = stream.prompt_tokens
        self.choices = stream.choices

    @property
    def completion_tokens(self) -> int:
        return self._stream.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return self._stream.cached_tokens

    async def receive(self) -> ChatDelta:
        delta = await self._stream.receive()
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.labels(self._model).observe(now - self._started)
            queued = self._stream.queue_seconds
            if queued is not None:
                self._m.queue.labels(self._model).observe(queued)
        else:
            self._m.itl.labels(self._model).observe(now - self._last)
        self._last = now
        return delta

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._m.e2e.labels(self._model, self._endpoint).observe(
                time.perf_counter() - self._started)
            tokens = self._m.tenant_tokens
            tokens.labels(self._tenant, "prompt").inc(self.prompt_tokens)
            tokens.labels(self._tenant, "cached").inc(self.cached_tokens)
            tokens.labels(self._tenant, "generated").inc(self.completion_tokens)
            if self._on_close is not None:
                self._on_close(self.prompt_tokens, self.cached_tokens, self.completion_tokens)
        self._stream.close()

    def __del__(self) -> None:
        # A stream dropped unread (its response never began, so nothing closed it) still
        # ends its generation and its tenant's lease.
        if not getattr(self, "_closed", True):
            self.close()


class _EngineStats(Collector):
    """Counters and gauges read from the engines at scrape time."""

    def __init__(self, models: ModelRegistry, embedding_cache: EmbeddingCache | None) -> None:
        self._models = models
        self._embedding_cache = embedding_cache

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("npugate_num_requests_running",
                                    "Generations being decoded", labels=["model"])
        waiting = GaugeMetricFamily("npugate_num_requests_waiting",
                                    "Generations queued", labels=["model"])
        prompt = CounterMetricFamily("npugate_prompt_tokens", "Prompt tokens", labels=["model"])
        generated = CounterMetricFamily("npugate_generation_tokens", "Generated tokens",
                                        labels=["model"])
        outcomes = CounterMetricFamily("npugate_chat_requests", "Finished generations",
                                       labels=["model", "outcome"])
        queued = GaugeMetricFamily("npugate_embedding_queue_size", "Embedding inputs queued",
                                   labels=["model"])
        inputs = CounterMetricFamily("npugate_embedding_inputs", "Embedding inputs",
                                     labels=["model"])
        runs = CounterMetricFamily("npugate_model_runs", "Model runs per execution provider",
                                   labels=["model", "provider"])
        fallback = GaugeMetricFamily("npugate_cpu_fallback",
                                     "1 when a model asked for QNN but serves on the CPU",
                                     labels=["model"])
        up = GaugeMetricFamily("npugate_model_ready", "1 when the model serves",
                               labels=["model", "task"])
        cache_counts = {name: CounterMetricFamily(
            f"npugate_prompt_cache_{name}", text, labels=["model"]) for name, text in (
                ("hits", "Prompts that reused a cached prefix"),
                ("misses", "Prompts that found none"),
                ("tokens_reused", "Prompt tokens taken from the cache"),
                ("evictions", "Cache entries dropped for room"))}
        cache_held = GaugeMetricFamily("npugate_prompt_cache_entries",
                                       "Prompt prefixes kept in the KV pool", labels=["model"])
        kv = GaugeMetricFamily("npugate_kv_cache_bytes", "Chat KV cache: budget, allocated, "
                               "reserved by running sequences, written", labels=["model", "kind"])
        kv_rows = GaugeMetricFamily("npugate_kv_cache_rows", "Chat KV pool rows: allocated "
                                    "and in use", labels=["model", "kind"])
        for entry in self._models.entries.values():
            up.add_metric([entry.id, entry.task], 1.0 if entry.status == "ready" else 0.0)
            if entry.chat is not None:
                s, mid = entry.chat.stats, entry.id
                running.add_metric([mid], entry.chat.running)
                waiting.add_metric([mid], entry.chat.waiting)
                prompt.add_metric([mid], s.prompt_tokens_total)
                generated.add_metric([mid], s.generated_tokens_total)
                for outcome, n in (("completed", s.completed_total),
                                   ("cancelled", s.cancelled_total),
                                   ("failed", s.failed_total)):
                    outcomes.add_metric([mid, outcome], n)
                runs.add_metric([mid, entry.chat.provider], s.model_runs_total)
                usage = entry.chat.kv_usage()
                for kind in ("budget", "allocated", "reserved", "used"):
                    kv.add_metric([mid, kind], usage[f"{kind}_bytes"])
                kv_rows.add_metric([mid, "allocated"], usage["rows"])
                kv_rows.add_metric([mid, "in_use"], usage["rows_in_use"])
                cache = entry.chat.cache_stats()
                for name, family in cache_counts.items():
                    family.add_metric([mid], cache[name])
                cache_held.add_metric([mid], cache["entries"])
            if entry.embedding is not None:
                b, mid = entry.embedding, entry.id
                queued.add_metric([mid], b.queued)
                inputs.add_metric([mid], b.stats.inputs_total)
                device = b.device_info()
                for provider, n in device["runs_by_provider"].items():
                    runs.add_metric([mid, provider], n)
                fell_back = device["fallback_reason"] is not None and \
                    b.provider != "QNNExecutionProvider"
                fallback.add_metric([mid], 1.0 if fell_back else 0.0)
        yield from (running, waiting, prompt, generated, outcomes, queued, inputs, runs,
                    fallback, up, kv, kv_rows, *cache_counts.values(), cache_held)
        if self._embedding_cache is not None:
            c = self._embedding_cache.stats
            for name, text, value in (("hits", "Embedding inputs answered from the cache",
                                       c.hits),
                                      ("misses", "Embedding inputs the cache did not hold",
                                       c.misses),
                                      ("evictions", "Embedding cache entries dropped for room",
                                       c.evictions)):
                counter = CounterMetricFamily(f"npugate_embedding_cache_{name}", text)
                counter.add_metric([], value)
                yield counter
            for name, text, value in (("bytes", "Bytes the embedding cache holds", c.bytes),
                                      ("entries", "Vectors the embedding cache holds",
                                       c.entries)):
                gauge = GaugeMetricFamily(f"npugate_embedding_cache_{name}", text)
                gauge.add_metric([], value)
                yield gauge
