"""The KV cache of one chat model's running sequences: one buffer within a byte budget.

The buffer is `[2 * layers, rows, kv_heads, cap, head_size]`: each layer's keys (and values)
are a contiguous `[rows, kv_heads, cap, head_size]` block, and so is any leading range of rows,
which is what GroupQueryAttention takes as past and present at once (it then writes only the
new positions, in place). Running sequences hold rows `0..n-1`: a decode step binds that range,
a prefill binds its own row.

Room is reserved per sequence (prompt + max_tokens) when it is admitted, so a sequence that
runs never lacks room. All rows share one stride (`cap`), so the buffer is shaped to the
longest reservation: `rows * cap` tokens never exceed the budget. The buffer is reshaped (the
used part copied) when a new sequence needs more rows or a longer `cap`, and dropped when no
sequence runs. Decode cost follows each row's own length, not `cap` (measured: 10.4 ms per
step at cap 512 and 10.7 ms at cap 8192, SmolLM2 int8, one row).

The buffer is anonymous memory the OS fills a page at a time, so what it costs is what was
written (`resident_bytes`, counted by the kernel), not its size. Rows that no sequence and no
prompt-cache entry holds give their pages back (`trim`).

The pool belongs to the engine's device thread (see `inference.chat.engine`): only `fits(...,
alone=True)`, which reads the configuration, and the reports (`describe`) are called from the
event loop. Others change its state through its methods only: `add`, `remove`, `copy`,
`set_length`, `advance`, and `handle` for the runtime objects a model keeps on its rows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

GRANULARITY = 256  # cap is rounded up to this many tokens, so small growth needs no reshape


@dataclass(frozen=True)
class KVLayout:
    """The cache geometry of one model."""

    tensors: int  # 2 * layers: keys and values
    kv_heads: int
    head_size: int
    dtype: np.dtype[Any]
    context: int

    @property
    def bytes_per_token(self) -> int:
        return self.tensors * self.kv_heads * self.head_size * self.dtype.itemsize


class KVPool:
    """Rows of KV cache for running sequences, within `budget_bytes`."""

    def __init__(self, layout: KVLayout, *, budget_bytes: int, max_rows: int,
                 spare_rows: int = 0) -> None:
        """`max_rows` running sequences at most; up to `spare_rows` more rows, where the budget
        allows, hold kept prefixes (the prompt cache) above the running rows."""
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.max_rows = max_rows
        self.spare_rows = spare_rows
        self.budget_tokens = budget_bytes // layout.bytes_per_token
        self.buffer: npt.NDArray[np.generic] | None = None
        self._memory: mmap.mmap | None = None  # the buffer's pages
        self._written: set[int] = set()  # rows that may hold pages
        self.reserved: list[int] = []  # per row in use: tokens reserved
        self.used: list[int] = []  # per row in use: tokens written
        self.reshapes = 0
        # Runtime handles on row ranges of the buffer (views, bindings), built by the model
        # and dropped with the buffer
        self._handles: dict[tuple[Any, ...], Any] = {}

    @property
    def rows(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.shape[1])

    @property
    def cap(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.shape[3])

    @property
    def in_use(self) -> int:
        return len(self.reserved)

    @property
    def allocated_bytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.nbytes)

    @property
    def largest_sequence(self) -> int:
        """The most tokens one sequence can ever hold here."""
        return min(self.layout.context, self.budget_tokens)

    def _target_cap(self, longest: int, rows: int) -> int:
        cap = min(-(-longest // GRANULARITY) * GRANULARITY, self.layout.context)
        return cap if rows * cap <= self.budget_tokens else longest

    def fits(self, needs: list[int], *, alone: bool = False) -> bool:
        """Whether sequences reserving `needs` tokens can join the running ones now (or, with
        `alone`, could ever run: with nothing else running)."""
        running = [] if alone else self.reserved
        rows = len(running) + len(needs)
        if rows > self.max_rows:
            return False
        longest = max([*running, *needs])
        if longest > self.largest_sequence:
            return False
        return rows * self._target_cap(longest, rows) <= self.budget_tokens

    def add(self, need: int) -> int:
        """Reserve a row (call `fits` first); returns its index. The buffer grows at the next
        `ensure`, on the device thread."""
        self.reserved.append(need)
        self.used.append(0)
        self._written.add(len(self.reserved) - 1)
        return len(self.reserved) - 1

    def ensure(self, kept: list[tuple[int, int]] | None = None) -> list[int | None]:
        """Device thread: shape the buffer so every reserved row fits, keeping what is written.
        `kept` lists other rows to carry over, (row, length), most valuable first; returns
        each one's row afterwards (None where it no longer fits). Running rows stay put."""
        kept = kept or []
        n = len(self.reserved)
        if n == 0 or (n <= self.rows and max(self.reserved) <= self.cap):
            return [row for row, _ in kept]
        cap = self._target_cap(max(self.reserved), n)
        rows = max(n, min(self.max_rows + self.spare_rows, self.budget_tokens // cap))
        layout = self.layout
        memory, fresh = _allocate((layout.tensors, rows, layout.kv_heads, cap,
                                   layout.head_size), layout.dtype)
        moved: list[int | None] = []
        if self.buffer is not None:
            for row, used in enumerate(self.used):
                if used:
                    fresh[:, row, :, :used] = self.buffer[:, row, :, :used]
            spare = iter(range(n, rows))
            for row, length in kept:
                target = next(spare, None) if length <= cap else None
                if target is not None:
                    fresh[:, target, :, :length] = self.buffer[:, row, :, :length]
                moved.append(target)
            self.reshapes += 1
        self.buffer, self._memory = fresh, memory
        self._written = set(range(n)) | {m for m in moved if m is not None}
        self._handles.clear()
        return moved or [None] * len(kept)

    def remove(self, row: int) -> int | None:
        """Device thread: free `row`. The last row moves into it to keep rows contiguous;
        returns the index it moved from (that sequence's new row is `row`), else None."""
        last = len(self.reserved) - 1
        moved: int | None = None
        if row != last:
            self.copy(last, row, self.used[last])
            self.reserved[row] = self.reserved[last]
            moved = last
        self.reserved.pop()
        self.used.pop()
        return moved

    def free(self) -> None:
        """Give the memory back (nothing runs and nothing is kept)."""
        self.buffer = self._memory = None
        self._written.clear()
        self._handles.clear()

    def trim(self, held: set[int]) -> None:
        """Device thread: give back the pages of every row that neither a running sequence
        nor `held` (the prompt cache's rows) needs."""
        if self.buffer is None or self._memory is None or _RELEASE is None:
            return  # no such advice on this OS: pages go back when the buffer is dropped
        keep = held | set(range(len(self.reserved)))
        base = self.buffer.ctypes.data
        for row in sorted(self._written - keep):
            for block in self.buffer[:, row]:  # one contiguous block per key or value tensor
                start = -(-(block.ctypes.data - base) // mmap.PAGESIZE) * mmap.PAGESIZE
                end = (block.ctypes.data - base + block.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if end > start:
                    self._memory.madvise(_RELEASE, start, end - start)
            self._written.discard(row)

    def resident_bytes(self) -> int:
        """What the buffer holds in memory now, page by page (the kernel's count). Read on
        the event loop while the device thread may replace the buffer: one reference, held
        for the call, keeps its pages mapped."""
        buffer = self.buffer
        if buffer is None:
            return 0
        return _resident(buffer.ctypes.data, buffer.nbytes)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Device thread: copy the first `length` positions of row `src` into row `dst`
        (a running row's written length becomes `length`)."""
        assert self.buffer is not None
        if length and src != dst:
            self.buffer[:, dst, :, :length] = self.buffer[:, src, :, :length]
        self._written.add(dst)
        if dst < len(self.used):
            self.used[dst] = length

    def set_length(self, row: int, length: int) -> None:
        """Row `row` holds `length` written positions (its KV is already there)."""
        self.used[row] = length

    def advance(self, rows: list[int]) -> None:
        """Each of `rows` was written one more position (a decode run)."""
        for row in rows:
            self.used[row] += 1

    def handle(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The runtime object kept under `key` for the current buffer (made by `make` the
        first time): the model's bindings of row ranges, dropped when the buffer changes."""
        found = self._handles.get(key)
        if found is None:
            found = self._handles[key] = make()
        return found

    def describe(self) -> dict[str, int]:
        """For /health and /metrics."""
        bpt = self.layout.bytes_per_token
        return {"budget_bytes": self.budget_bytes, "allocated_bytes": self.allocated_bytes,
                "reserved_bytes": sum(self.reserved) * bpt, "used_bytes": sum(self.used) * bpt,
                "resident_bytes": self.resident_bytes(),
                "rows": self.rows, "rows_in_use": self.in_use, "cap_tokens": self.cap,
                "bytes_per_token": bpt, "reshapes": self.reshapes}


def _allocate(shape: tuple[int, ...], dtype: np.dtype[Any]
              ) -> tuple[mmap.mmap, npt.NDArray[np.generic]]:
    """Anonymous memory the OS zero-fills a page at a time, as positions are first written,
    so a row costs memory for what it holds. numpy's own allocator asks for transparent huge
    pages on large arrays; then writing one position of a row zero-fills 2 MiB, and a reshape
    that copied 4 short rows into a 2 GiB buffer took 2.1 s instead of 17 ms (measured here)."""
    size = max(1, int(np.prod(shape)) * dtype.itemsize)
    memory = mmap.mmap(-1, size)
    return memory, np.frombuffer(memory, dtype=dtype).reshape(shape)


# Shared anonymous memory (what mmap(-1) gives): MADV_REMOVE frees its pages, where
# MADV_DONTNEED would only unmap them. Linux only; elsewhere nothing is released early.
_RELEASE: int | None = getattr(mmap, "MADV_REMOVE", None)
_LIBC_NAME = ctypes.util.find_library("c")
_mincore = getattr(ctypes.CDLL(_LIBC_NAME), "mincore", None) if _LIBC_NAME else None


def _resident(address: int, size: int) -> int:
    """Bytes of [address, address + size) in memory now: mincore(2), page by page (all of
    it where the OS cannot tell)."""
    if _mincore is None:
        return size
    first = address // mmap.PAGESIZE * mmap.PAGESIZE
    pages = -(-(address + size - first) // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    if _mincore(ctypes.c_void_p(first), ctypes.c_size_t(pages * mmap.PAGESIZE), vector) != 0:
        return size  # cannot tell: count all of it
    resident = np.frombuffer(bytes(vector), dtype=np.uint8) & 1
    return int(resident.sum()) * mmap.PAGESIZE
