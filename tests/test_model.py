from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.chat.model import ChatModel
from inference.errors import ModelLoadError


def _prefill_vs_cached(model: ChatModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = model.encode_prompt([{"role": "user", "content": "Count to five: one, two,"}])
    full = model.forward(model.new_cache(), ids)
    cache = model.new_cache()
    model.forward(cache, ids[:-3])
    chunked = model.forward(cache, ids[-3:])  # several positions through the cache
    cache = model.new_cache()
    model.forward(cache, ids[:-3])
    for token in ids[-3:]:
        step = model.forward(cache, [token])  # one token at a time, as decoding does
    assert cache.length == len(ids)
    return full, chunked, step


def test_kv_cache_is_exact_on_phi3_layout(phi3: ChatModel) -> None:
    full, chunked, step = _prefill_vs_cached(phi3)
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    np.testing.assert_allclose(step, full, atol=1e-5)


def test_kv_cache_on_quantized_smollm2(smollm2: ChatModel) -> None:
    full, chunked, step = _prefill_vs_cached(smollm2)
    np.testing.assert_allclose(chunked, full, atol=1e-4)
    # MatMulNBits quantizes activations to int8 per row with a different kernel for a single
    # row, so one-token steps differ slightly from multi-token runs (not a cache error).
    assert np.corrcoef(step, full)[0, 1] > 0.999
    assert int(np.argmax(step)) == int(np.argmax(full))


def test_corrupt_onnx_is_a_load_error(phi3_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(phi3_dir, folder)
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime could not load"):
        ChatModel.load(folder)


def test_pool_runs_match_the_plain_loop_and_pools_stay_apart(phi3: ChatModel) -> None:
    # Prefill then batched decode over a KV pool gives the plain loop's logits; two pools on
    # one model (engines in tests share models) never see each other's buffers.
    from inference.chat.kv_pool import KVPool

    prompts = [phi3.encode_prompt([{"role": "user", "content": text}])
               for text in ("Count to five: one, two,", "hi", "A longer prompt " * 20)]
    expected = []
    for ids in prompts:
        cache = phi3.new_cache()
        first = phi3.forward(cache, ids)
        expected.append((first, phi3.forward(cache, [int(np.argmax(first))])))
    small = KVPool(phi3.kv_layout(), budget_bytes=2**24, max_rows=4)
    big = KVPool(phi3.kv_layout(), budget_bytes=2**26, max_rows=4)
    for pool, need, order in ((small, 300, [0, 1, 2]), (big, 3000, [2, 0, 1])):
        firsts = [phi3.prefill(pool, pool.add(need), prompts[i]) for i in order]
        steps = phi3.decode(pool, [int(np.argmax(f)) for f in firsts])
        for i, got_first, got_step in zip(order, firsts, steps, strict=True):
            want_first, want_step = expected[i]
            np.testing.assert_allclose(got_first, want_first, atol=1e-5)
            np.testing.assert_allclose(got_step, want_step, atol=1e-5)
        assert pool.buffer is not None  # the run wrote this pool's own buffer
        for row, i in enumerate(order):
            assert np.abs(pool.buffer[:, row, :, :len(prompts[i])]).min(axis=-1).any()
    assert small.cap < big.cap


def test_kept_decode_bindings_match_fresh_ones(phi3: ChatModel,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Decode steps reuse each row count's binding and one logits buffer per pool; over steps
    # with the row count changing and the pool reshaped in between, they give the logits that
    # a fresh binding per run (the path for graphs with a symbolic logits width) gives.
    import numpy as np

    from inference.chat.kv_pool import KVPool

    assert phi3._logits_width  # the kept bindings are what this fixture runs
    prompts = [phi3.encode_prompt([{"role": "user", "content": text}])
               for text in ("Count to five: one, two,", "hi", "A longer prompt " * 9)]

    def steps() -> list[np.ndarray]:
        pool = KVPool(phi3.kv_layout(), budget_bytes=2**26, max_rows=4)
        out = []
        for i, ids in enumerate(prompts):
            phi3.prefill(pool, pool.add(100 if i < 2 else 900), ids)  # the last one reshapes
            for _ in range(3):
                logits = phi3.decode(pool, [7] * (i + 1))
                out.append(logits.copy())  # the kept buffer is overwritten by the next step
        for rows in (2, 1, 3):  # row counts bound before the reshape, and after it
            out.append(phi3.decode(pool, [5] * rows).copy())
        return out

    kept = steps()
    monkeypatch.setattr(phi3, "_logits_width", 0)
    fresh = steps()
    assert [a.shape for a in kept] == [b.shape for b in fresh]
    for a, b in zip(kept, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
