"""One chat model's ONNX session and tokenizer, and the blocking prefill/decode forward pass.

The KV cache of each sequence lives in a `KVCache`; the model itself is stateless between calls,
so any number of sequences can share it (one call at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from inference.chat.spec import ChatModelSpec
from inference.chat.template import ChatTemplate
from inference.errors import ContextTooLong, ModelLoadError
from inference.providers import LoadedSession, cpu_session


@dataclass
class KVCache:
    """Past keys/values of one sequence, keyed by the graph's past input names."""

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
        self._output_names = [spec.logits_name, *self._present_names]
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True),
                              _logits_width(self._session, spec.logits_name))
        # No token stands for more text than the longest one (+1 for a leading space a
        # decoder may strip), so a prompt of more bytes than the context times this cannot fit
        # and is refused without tokenizing it (a second of CPU per MiB on 2 cores).
        self.max_token_bytes = 1 + max(
            len(self.tokenizer.decode([i], skip_special_tokens=False).encode())
            for i in range(self.tokenizer.get_vocab_size(with_added_tokens=True)))

    @classmethod
    def load(cls, folder: Path, *, model_id: str | None = None,
             threads: int | None = None) -> ChatModel:
        """Load a model folder in the Phi-3-mini ONNX layout onto the CPU."""
        spec = ChatModelSpec.from_folder(folder, model_id)
        return cls(spec, cpu_session(spec.onnx_file, threads=threads))

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the chat template and tokenize it (the template supplies special tokens)."""
        text = self.template.render(messages, add_generation_prompt=True)
        size, context = len(text.encode()), self.spec.context_length
        if size > context * self.max_token_bytes:
            raise ContextTooLong(
                f"this model's maximum context length is {context} tokens, but the messages "
                f"are {size} bytes, more than that many tokens can hold", param="messages")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def new_cache(self) -> KVCache:
        """An empty cache for a new sequence."""
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_size)
        empty = np.zeros(shape, dtype=self._kv_dtype)
        return KVCache(past=dict.fromkeys(self._past_names, empty), length=0)

    def forward(self, cache: KVCache, token_ids: list[int]) -> npt.NDArray[np.float32]:
        """Run `token_ids` after the cached context; return the last position's logits.

        Blocking: call it off the event loop. Updates `cache` in place.
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
