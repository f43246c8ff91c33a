"""One chat model's ONNX session and tokenizer, and its blocking forward passes.

Serving runs on a shared `KVPool`: `prefill` writes one sequence's prompt (or a chunk of it)
into its row, and `decode` steps every running row by one token in a single model run, the
pool bound as both past and present so only new positions are written. `forward` is the plain
single-sequence loop (the graph concatenates its cache each call): the baseline the
benchmarks and the build check compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from inference.chat.grammar import Guide
from inference.chat.kv_pool import GRANULARITY, KVLayout, KVPool
from inference.chat.spec import ChatModelSpec
from inference.chat.template import ChatTemplate
from inference.errors import ContextTooLong, InvalidInput, ModelLoadError
from inference.providers import LoadedSession, cpu_session


@dataclass(frozen=True)
class _DecodeBinding:
    """A decode run's binding of pool rows 0..n-1, its logits buffer, and the runtime values
    the binding points into (kept alive with it)."""

    io: ort.IOBinding
    logits: npt.NDArray[np.generic]
    values: tuple[ort.OrtValue, ...]


@dataclass(frozen=True)
class PreparedRun:
    """One model run over pool rows, bound and ready: calling it runs it (blocking), updates
    the rows' lengths and returns the logits. Holds the runtime values the binding points
    into until then."""

    session: ort.InferenceSession
    io: ort.IOBinding
    finish: Callable[[], npt.NDArray[np.float32]]
    values: tuple[ort.OrtValue, ...]

    def __call__(self) -> npt.NDArray[np.float32]:
        self.session.run_with_iobinding(self.io)
        return self.finish()


@dataclass
class KVCache:
    """Past keys/values of one sequence for the plain loop, keyed by past input names."""

    past: dict[str, npt.NDArray[np.generic]] = field(default_factory=dict)
    length: int = 0


class ChatModel:
    """A loaded chat model: tokenizer, template and ONNX session."""

    def __init__(self, spec: ChatModelSpec, loaded: LoadedSession) -> None:
        self.spec = spec
        self.provider = loaded.provider
        self._session = loaded.session
        try:
            self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
        except Exception as exc:
            raise ModelLoadError(f"{spec.tokenizer_file} is not a valid tokenizer: {exc}") from exc
        self.template = ChatTemplate(spec.chat_template, bos_token=spec.bos_token,
                                     eos_token=spec.eos_token)
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        for name in (spec.input_ids_name, spec.attention_mask_name):
            if name not in inputs:
                raise ModelLoadError(f"{spec.onnx_file} has no input named {name!r}")
        self._has_position_ids = spec.position_ids_name in inputs
        self._past_names = [n % i for i in range(spec.num_layers)
                            for n in (spec.past_key_names, spec.past_value_names)]
        self._present_names = [n % i for i in range(spec.num_layers)
                               for n in (spec.present_key_names, spec.present_value_names)]
        missing = [n for n in self._past_names if n not in inputs]
        missing += [n for n in self._present_names + [spec.logits_name] if n not in outputs]
        if missing:
            raise ModelLoadError(f"{spec.onnx_file} lacks tensors named in genai_config.json: "
                                 f"{', '.join(missing[:4])}")
        kv_type = inputs[self._past_names[0]].type
        self._kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self._mask_dtype = np.int32 if "int32" in inputs[spec.attention_mask_name].type \
            else np.int64
        self._output_names = [spec.logits_name, *self._present_names]
        self._logits_width = _logits_width(self._session, spec.logits_name)  # 0: not fixed
        self._logits_dtype = np.float16 if "float16" in next(
            o.type for o in self._session.get_outputs() if o.name == spec.logits_name) \
            else np.float32
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True),
                              self._logits_width)
        self.guide = Guide(self.tokenizer, self.vocab_size, spec.eos_token_ids)
        # No token stands for more text than the longest one (+1 for a leading space a
        # decoder may strip), so a prompt of more bytes than the context times this cannot fit
        # and is refused without tokenizing it (a second of CPU per MiB on 2 cores).
        self.max_token_bytes = 1 + max(
            len(self.tokenizer.decode([i], skip_special_tokens=False).encode())
            for i in range(self.tokenizer.get_vocab_size(with_added_tokens=True)))
        self.batch_invariant = self._lone_step_is_batched_step()

    @classmethod
    def load(cls, folder: Path, *, model_id: str | None = None,
             threads: int | None = None) -> ChatModel:
        """Load a model folder in the Phi-3-mini ONNX layout onto the CPU."""
        spec = ChatModelSpec.from_folder(folder, model_id)
        return cls(spec, cpu_session(spec.onnx_file, threads=threads))

    def encode_prompt(self, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render the chat template and tokenize it (the template supplies special tokens).
        `tools` reach templates that read them (`template.supports_tools`)."""
        text = self.template.render(messages, add_generation_prompt=True, tools=tools)
        size, context = len(text.encode()), self.spec.context_length
        if size > context * self.max_token_bytes:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens, but the messages "
                f"are {size} bytes, more than that many tokens can hold", param="messages")
        # encode_batch releases the GIL and encode does not: a 300 KiB prompt held the event
        # loop for 0.23 s from this worker thread
        return list(self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids)

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Tokenize plain prompts (no chat template), with the tokenizer's own special tokens
        (a BOS where the model expects one)."""
        limit = self.spec.context_length * self.max_token_bytes
        for text in texts:
            if len(text) > limit or len(text.encode()) > limit:
                raise ContextTooLong(
                    f"this model's maximum context length is {self.spec.context_length} "
                    f"tokens, but a prompt is {len(text.encode())} bytes, more than that many "
                    "tokens can hold", param="prompt")
        return [list(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def check_token_ids(self, prompts: list[list[int]]) -> None:
        """Refuse token ids outside this model's vocabulary."""
        for ids in prompts:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidInput(f"token id {bad[0]} is outside this model's vocabulary "
                                   f"(0..{self.vocab_size - 1})", param="prompt")

    def kv_layout(self) -> KVLayout:
        return KVLayout(tensors=2 * self.spec.num_layers, kv_heads=self.spec.num_kv_heads,
                        head_size=self.spec.head_size, dtype=np.dtype(self._kv_dtype),
                        context=self.spec.context_length)

    def prefill(self, pool: KVPool, row: int, token_ids: list[int]) -> npt.NDArray[np.float32]:
        """Write `token_ids` after what row `row` holds; return the last position's logits.
        Blocking: call it on the device thread."""
        return self.prepare_prefill(pool, row, token_ids)()

    def decode(self, pool: KVPool, tokens: list[int | None]) -> npt.NDArray[np.float32]:
        """One token for each of the rows `0..len(tokens)-1`, in one model run; returns their
        logits, one row each, in a buffer the next `decode` on this pool overwrites. Rows may
        hold different lengths. A row given None (one still reading its prompt) is run on a
        placeholder that lands where its next write goes, and is not advanced. Blocking."""
        return self.prepare_decode(pool, tokens)()

    def prepare_prefill(self, pool: KVPool, row: int, token_ids: list[int]) -> PreparedRun:
        """`prefill`, bound and not yet run: calling the result runs it. The engine does its
        own work between the two (it wakes the event loop just before the run)."""
        past = pool.used[row]
        total = past + len(token_ids)
        pool.ensure()  # the engine shapes the pool first (then this is a no-op); direct
        # callers (benchmarks, tests) keep nothing beyond running rows
        io, views = self._cache_binding(pool, row, row + 1)
        io.bind_output(self.spec.logits_name)  # its shape varies with the chunk: allocated
        self._bind_inputs(io, np.asarray([token_ids], dtype=np.int64),
                          np.ones((1, total), dtype=self._mask_dtype),
                          np.arange(past, total, dtype=np.int64)[None, :])

        def finish() -> npt.NDArray[np.float32]:
            pool.set_length(row, total)
            logits = io.get_outputs()[-1].numpy()  # the logits only: the caches are the pool
            return np.asarray(logits[0, -1], dtype=np.float32)
        return PreparedRun(self._session, io, finish, tuple(views))

    def prepare_decode(self, pool: KVPool, tokens: list[int | None]) -> PreparedRun:
        """`decode`, bound and not yet run (see `prepare_prefill`)."""
        n = len(tokens)
        lengths = np.asarray(pool.used[:n], dtype=np.int64)
        mask = (np.arange(int(lengths.max()) + 1)[None, :] <= lengths[:, None]
                ).astype(self._mask_dtype)  # right-padded: row b sees its own length + 1
        ids = np.asarray([0 if t is None else t for t in tokens], dtype=np.int64)[:, None]
        stepped = [row for row, token in enumerate(tokens) if token is not None]
        pool.ensure()
        if self._logits_width:
            bound = self._decode_binding(pool, n)
            io, views, logits = bound.io, bound.values, bound.logits
        else:  # a graph whose logits width is symbolic: they are allocated per run
            io, fresh = self._cache_binding(pool, 0, n)
            io.bind_output(self.spec.logits_name)
            views, logits = tuple(fresh), None
        self._bind_inputs(io, ids, mask, lengths[:, None])

        def finish() -> npt.NDArray[np.float32]:
            pool.advance(stepped)
            out = io.get_outputs()[-1].numpy() if logits is None else logits
            return np.asarray(out[:, -1], dtype=np.float32)
        return PreparedRun(self._session, io, finish, views)

    def _decode_binding(self, pool: KVPool, n: int) -> _DecodeBinding:
        """The binding of rows 0..n-1 for one-token runs, kept with the pool (until it is
        reshaped): the cache tensors and the logits output stay bound across steps, so a step
        binds only its three small inputs (binding all 2 x layers caches afresh took about
        0.5 ms of a 21 ms 8-row step, measured here)."""
        def make() -> _DecodeBinding:
            # one logits buffer for every row count
            shared = pool.handle(("logits",), lambda: np.empty(
                (pool.max_rows, 1, self._logits_width), dtype=self._logits_dtype))
            logits = shared[:n]
            out = ort.OrtValue.ortvalue_from_numpy(logits)
            io, views = self._cache_binding(pool, 0, n)
            io.bind_ortvalue_output(self.spec.logits_name, out)
            return _DecodeBinding(io, logits, (out, *views))
        bound = pool.handle(("decode", n), make)
        assert isinstance(bound, _DecodeBinding)
        return bound

    def _cache_binding(self, pool: KVPool, first: int, end: int
                       ) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        """A new binding with rows first..end-1 of the pool as both past and present, and
        the runtime's views of them (keep them as long as the binding)."""
        assert pool.buffer is not None
        io = self._session.io_binding()
        views = [ort.OrtValue.ortvalue_from_numpy(pool.buffer[i, first:end])
                 for i in range(len(self._past_names))]
        for past, present, view in zip(self._past_names, self._present_names, views,
                                       strict=True):
            io.bind_ortvalue_input(past, view)
            io.bind_ortvalue_output(present, view)  # same buffer: written in place
        return io, views

    def _bind_inputs(self, io: ort.IOBinding, input_ids: npt.NDArray[np.int64],
                     mask: npt.NDArray[np.generic], positions: npt.NDArray[np.int64]) -> None:
        io.bind_cpu_input(self.spec.input_ids_name, input_ids)
        io.bind_cpu_input(self.spec.attention_mask_name, mask)
        if self._has_position_ids:
            io.bind_cpu_input(self.spec.position_ids_name, positions)

    def _lone_step_is_batched_step(self) -> bool:
        """Whether a one-row decode run gives a row the same logits, bit for bit, as a run of
        several rows. A row's logits never depend on its mates once two or more rows run
        (measured: any count, any mates, any position). But onnxruntime's int4 `MatMulNBits`
        takes another path for a single row, which sums in another order (2.4e-7 apart on
        the Phi-3 fixture's logits); the int8 builds here are exact either way."""
        prompt = self.encode_texts(["The lighthouse keeper climbed the stairs."])[0]
        pool = KVPool(self.kv_layout(), max_rows=2,
                      budget_bytes=2 * GRANULARITY * self.kv_layout().bytes_per_token)
        for _ in range(2):
            self.prefill(pool, pool.add(len(prompt) + 1), prompt)
        together = self.decode(pool, [1, 1])[0].copy()
        pool.set_length(0, len(prompt))
        alone = self.decode(pool, [1])[0]
        return bool(np.array_equal(alone, together))

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], bool]:
        """The plain loop's greedy continuation of `prompt`: up to `max_tokens` token ids, and
        whether it ended at an end-of-sequence id (which is left out). Blocking. The reference
        that served greedy output is held to, whatever a build happens to answer."""
        cache = self.new_cache()
        token = int(np.argmax(self.forward(cache, prompt)))
        out: list[int] = []
        while token not in self.spec.eos_token_ids:
            out.append(token)
            if len(out) == max_tokens:
                return out, False
            token = int(np.argmax(self.forward(cache, [token])))
        return out, True

    def new_cache(self) -> KVCache:
        """An empty cache for the plain loop (`forward`)."""
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_size)
        empty = np.zeros(shape, dtype=self._kv_dtype)
        return KVCache(past=dict.fromkeys(self._past_names, empty), length=0)

    def forward(self, cache: KVCache, token_ids: list[int]) -> npt.NDArray[np.float32]:
        """The plain loop: run `token_ids` after the cached context (concatenated by the
        graph); return the last position's logits. Blocking. Updates `cache` in place.
        """
        n = len(token_ids)
        total = cache.length + n
        feeds: dict[str, npt.NDArray[np.generic]] = {
            self.spec.input_ids_name: np.asarray([token_ids], dtype=np.int64),
            self.spec.attention_mask_name: np.ones((1, total), dtype=np.int64),
            **cache.past,
        }
        if self._has_position_ids:
            feeds[self.spec.position_ids_name] = np.arange(cache.length, total,
                                                           dtype=np.int64)[None, :]
        logits, *present = self._session.run(self._output_names, feeds)
        cache.past = dict(zip(self._past_names, present, strict=True))
        cache.length = total
        # Graphs built with a pruned LM head return one position; others return all of them.
        return np.asarray(logits[0, -1], dtype=np.float32)


def _logits_width(session: object, name: str) -> int:
    for out in session.get_outputs():  # type: ignore[attr-defined]
        if out.name == name and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return 0
