"""The KV pool's accounting and buffer moves: room within the budget, reshapes that keep what
was written, compaction when a row leaves."""

from __future__ import annotations

import numpy as np
import pytest

from inference.chat.kv_pool import GRANULARITY, KVLayout, KVPool

LAYOUT = KVLayout(tensors=4, kv_heads=2, head_size=8, dtype=np.dtype(np.float32), context=4096)


def _pool(tokens: int, rows: int = 8) -> KVPool:
    return KVPool(LAYOUT, budget_bytes=tokens * LAYOUT.bytes_per_token, max_rows=rows)


def _write(pool: KVPool, row: int, length: int, value: float) -> None:
    assert pool.buffer is not None
    pool.buffer[:, row, :, :length] = value
    pool.set_length(row, length)


def test_fits_counts_rows_and_the_shared_stride() -> None:
    pool = _pool(4096)
    assert pool.fits([1000, 1000, 1000, 1000])  # 4 rows x 1024 = 4096
    assert not pool.fits([1000] * 5)
    assert not pool.fits([1000, 3500])  # the stride follows the longest: 2 x 3584 > 4096
    assert pool.fits([4096], alone=True) and not pool.fits([4097], alone=True)
    assert not _pool(10**6, rows=2).fits([10, 10, 10])  # max_rows
    assert pool.largest_sequence == 4096


def test_reshape_keeps_what_was_written_and_stays_in_budget() -> None:
    pool = _pool(4096)
    for need in (100, 200):
        pool.add(need)
    pool.ensure()
    assert pool.cap == GRANULARITY and pool.rows == 8  # as many rows as the budget allows
    _write(pool, 0, 100, 1.0)
    _write(pool, 1, 150, 2.0)
    assert not pool.fits([1500])  # 3 rows of 1500 would not fit 4096 tokens
    assert pool.fits([1200])
    pool.add(1200)
    pool.ensure()  # a longer stride: fewer rows, the data moved along
    assert pool.cap == 1280 and pool.rows == 3
    assert pool.allocated_bytes <= pool.budget_bytes
    assert pool.buffer is not None and pool.reshapes == 1
    assert (pool.buffer[:, 0, :, :100] == 1.0).all() and (pool.buffer[:, 1, :, :150] == 2.0).all()


def test_a_leaving_row_is_filled_by_the_last_and_free_gives_memory_back() -> None:
    pool = _pool(4096)
    for need in (100, 100, 100):
        pool.add(need)
    pool.ensure()
    for row in range(3):
        _write(pool, row, 10 + row, float(row))
    assert pool.remove(0) == 2  # the last row moved into row 0
    assert pool.buffer is not None
    assert pool.used == [12, 11] and (pool.buffer[:, 0, :, :12] == 2.0).all()
    assert pool.remove(1) is None
    assert pool.remove(0) is None
    assert pool.buffer is not None  # rows above the running ones may hold kept prefixes
    pool.free()
    assert pool.buffer is None and pool.allocated_bytes == 0


@pytest.mark.parametrize("needs", [[10], [4096], [1000, 1000, 1000, 1000]])
def test_describe_reports_use(needs: list[int]) -> None:
    pool = _pool(4096)
    for need in needs:
        pool.add(need)
    pool.ensure()
    info = pool.describe()
    assert info["reserved_bytes"] == sum(needs) * LAYOUT.bytes_per_token
    assert info["allocated_bytes"] <= info["budget_bytes"]
    assert info["rows_in_use"] == len(needs)


def test_reshape_carries_kept_rows_above_the_running_ones() -> None:
    pool = KVPool(LAYOUT, budget_bytes=5000 * LAYOUT.bytes_per_token, max_rows=2,
                  spare_rows=2)
    pool.add(100)
    pool.ensure()
    assert pool.rows == 4  # 2 running + 2 spare, within the budget at cap 256
    _write(pool, 0, 50, 1.0)
    assert pool.buffer is not None
    pool.buffer[:, 2, :, :64] = 7.0  # a kept prefix in a spare row
    pool.buffer[:, 3, :, :64] = 8.0
    pool.add(1500)  # a longer stride: 3 rows of 1536 fit in 5000 tokens, so one spare
    moved = pool.ensure([(3, 64), (2, 64)])  # most valuable first
    assert pool.rows == 3 and pool.allocated_bytes <= pool.budget_bytes
    assert moved[0] == 2 and moved[1] is None  # one spare row left: the first one kept
    assert (pool.buffer[:, 2, :, :64] == 8.0).all() and (pool.buffer[:, 0, :, :50] == 1.0).all()


def test_memory_is_what_was_written_and_freed_rows_give_it_back() -> None:
    layout = KVLayout(tensors=4, kv_heads=2, head_size=64, dtype=np.dtype(np.float32),
                      context=4096)
    pool = KVPool(layout, budget_bytes=4 * 4096 * layout.bytes_per_token, max_rows=4)
    for _ in range(3):
        pool.add(1000)
    pool.ensure()
    assert pool.allocated_bytes > 0 and pool.resident_bytes() == 0  # nothing written yet
    assert pool.buffer is not None
    pool.buffer[:, :3, :, :800] = 1.0
    written = 3 * 800 * layout.bytes_per_token
    assert pool.resident_bytes() == written  # pages of 64 KiB blocks: exact here
    pool.copy(2, 3, 800)  # a prompt-cache entry moves to spare row 3
    pool.remove(2)
    pool.trim(held={3})  # row 2 is neither running nor held: its pages go back
    assert pool.resident_bytes() == written
    pool.trim(held=set())  # the entry was evicted
    assert pool.resident_bytes() == 2 * 800 * layout.bytes_per_token
    assert pool.describe()["resident_bytes"] == pool.resident_bytes()
