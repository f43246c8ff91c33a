from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from inference.embed.model import EmbeddingModel
from inference.errors import ContextTooLong, InvalidInput

TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Stock markets fell sharply.",
         "naïve café 東京 🤖"]


def _token_outputs(model: EmbeddingModel, ids: list[int]) -> np.ndarray:
    """The graph's token embeddings for one input, straight from onnxruntime."""
    session = ort.InferenceSession(str(model.spec.onnx_file), providers=["CPUExecutionProvider"])
    x = np.array([ids], dtype=np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x),
             "token_type_ids": np.zeros_like(x), "position_ids": np.arange(len(ids))[None]}
    names = {i.name for i in session.get_inputs()}
    return np.asarray(session.run(None, {k: v for k, v in feeds.items() if k in names})[0][0])


def test_minilm_mean_pooling_parity(minilm: EmbeddingModel) -> None:
    for ids, got in zip(minilm.tokenize(TEXTS), minilm.embed_batch(minilm.tokenize(TEXTS)),
                        strict=True):
        tokens = _token_outputs(minilm, ids)
        want = tokens.mean(axis=0)
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert got.shape == (384,) and abs(np.linalg.norm(got) - 1) < 1e-5


def test_bert_fixture_cls_pooling_parity(bert_tiny: EmbeddingModel) -> None:
    ids = bert_tiny.tokenize(TEXTS[:2])
    for one, got in zip(ids, bert_tiny.embed_batch(ids), strict=True):
        cls = _token_outputs(bert_tiny, one)[0]
        np.testing.assert_allclose(got, cls / np.linalg.norm(cls), atol=1e-5)


def test_batched_equals_alone(minilm: EmbeddingModel) -> None:
    ids = minilm.tokenize(TEXTS)
    batched = minilm.embed_batch(ids)  # padded to the longest
    for one, vec in zip(ids, batched, strict=True):
        np.testing.assert_allclose(minilm.embed_batch([one])[0], vec, atol=1e-5)


def test_embeddings_mean_something(minilm: EmbeddingModel) -> None:
    cat, feline, stocks, _ = minilm.embed_batch(minilm.tokenize(TEXTS))
    assert float(cat @ feline) > 0.5 > float(cat @ stocks)


def test_token_ids_get_special_tokens(minilm: EmbeddingModel) -> None:
    plain = minilm.tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    assert minilm.wrap_ids(plain) == minilm.tokenize([TEXTS[0]])[0]
    with pytest.raises(InvalidInput, match="outside this model's vocabulary .*"
                       "check_embedding_ctx_length=False"):
        minilm.wrap_ids([10**9])


def test_over_long_input_is_rejected(minilm: EmbeddingModel) -> None:
    ids = minilm.tokenize(["word " * 300])[0]
    with pytest.raises(ContextTooLong, match="at most 256"):
        minilm.check_length(ids, 0)
