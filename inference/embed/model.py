"""One embedding model: tokenizer, session(s), padding, pooling and normalisation.

`embed_batch` is blocking; the batcher calls it off the event loop. Inputs longer than the
model's maximum length are rejected (`ContextTooLong`), never silently truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from inference.embed.spec import EmbeddingModelSpec
from inference.errors import ContextTooLong, InvalidInput, ModelLoadError
from inference.limits import QnnOptions
from inference.providers import EncoderSession, load_encoder_session

Vector = npt.NDArray[np.float32]


class EmbeddingModel:
    """A loaded embedding model."""

    def __init__(self, spec: EmbeddingModelSpec, session: EncoderSession) -> None:
        self.spec = spec
        self.session = session
        try:
            self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
        except Exception as exc:
            raise ModelLoadError(f"{spec.tokenizer_file} is not a valid tokenizer: {exc}") from exc
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._prefix, self._suffix = self._special_wrapping()
        # No token stands for more text than the longest vocabulary entry (+1 for the space
        # before it), so a text of more bytes than max_length times this cannot fit. Checked
        # before tokenizing: 4 MiB of text costs seconds of tokenizer CPU to refuse otherwise.
        longest = max(len(piece.encode()) for piece in self.tokenizer.get_vocab(True))
        self.max_text_bytes = spec.max_length * (longest + 1)

    @classmethod
    def load(cls, folder: Path, *, model_id: str | None = None, device: str = "cpu",
             cache_dir: Path | None = None, qnn: QnnOptions | None = None) -> EmbeddingModel:
        """Load a folder; `device` is "cpu", "qnn" or "auto" (see `inference.providers`)."""
        spec = EmbeddingModelSpec.from_folder(folder, model_id)
        return cls(spec, load_encoder_session(spec.onnx_file, device=device,
                                              cache_dir=cache_dir, max_length=spec.max_length,
                                              qnn=qnn))

    @property
    def provider(self) -> str:
        return self.session.provider

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, one list per text."""
        if len(texts) <= 8:  # encode_batch's thread pool costs more than it saves here
            return [list(self.tokenizer.encode(t, add_special_tokens=True).ids) for t in texts]
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts),
                                                                 add_special_tokens=True)]

    def wrap_ids(self, ids: Sequence[int]) -> list[int]:
        """Add the model's special tokens around caller-supplied token ids."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInput(
                f"token id {bad[0]} is outside this model's vocabulary (0..{self.vocab_size - 1})"
                ": these ids were not made by its tokenizer, so send the text instead. "
                "LangChain's OpenAIEmbeddings sends OpenAI's own (tiktoken) ids unless it is "
                "given check_embedding_ctx_length=False", param="input")
        return [*self._prefix, *ids, *self._suffix]

    def check_text_size(self, text: str, index: int) -> None:
        """Refuse, before tokenizing, a text too large for any tokenization to fit."""
        if len(text) > self.max_text_bytes or len(text.encode()) > self.max_text_bytes:
            raise ContextTooLong(
                f"input {index} is {len(text.encode())} bytes; this model reads at most "
                f"{self.spec.max_length} tokens, and takes at most {self.max_text_bytes} bytes "
                "of text. Split the text into shorter pieces.", param="input")

    def check_length(self, ids: Sequence[int], index: int) -> None:
        if len(ids) > self.spec.max_length:
            raise ContextTooLong(
                f"input {index} has {len(ids)} tokens; this model accepts at most "
                f"{self.spec.max_length}. Split the text into shorter pieces.", param="input")

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> list[Vector]:
        """Embed token-id lists (each within max_length). Blocking."""
        width = max(len(ids) for ids in batch)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        hidden = self.session.run(input_ids, mask)
        if hidden.ndim == 2:  # the graph pools itself
            pooled = hidden
        else:
            pooled = pool(hidden[:, :width], mask, self.spec.pooling)
        if self.spec.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return [np.ascontiguousarray(v, dtype=np.float32) for v in pooled]

    def _special_wrapping(self) -> tuple[list[int], list[int]]:
        # Where the post-processor puts special tokens around a single sequence.
        plain = self.tokenizer.encode("hello", add_special_tokens=False).ids
        full = self.tokenizer.encode("hello", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain):])
        return [], []


def pool(hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64], mode: str
         ) -> npt.NDArray[np.float32]:
    """Pool token embeddings [B, S, H] into [B, H] under an attention mask [B, S]."""
    if mode == "cls":
        return np.asarray(hidden[:, 0], dtype=np.float32)
    m = mask[:, :, None].astype(hidden.dtype)
    if mode == "max":
        return np.asarray(np.where(m > 0, hidden, -np.inf).max(axis=1), dtype=np.float32)
    return np.asarray((hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9),
                      dtype=np.float32)
