"""The prompt cache: prompt prefixes kept in the KV pool after their sequences end.

Chat clients resend the whole conversation every turn. When a sequence leaves the pool, the
KV of its prompt stays in a pool row above the running ones as an entry; a later prompt that
starts with the same tokens copies that prefix into its own row and prefills only the rest.

- Only whole prefill chunks are kept: an entry covers the prompt up to a multiple of the chunk
  size, and a hit reuses a multiple of it. Prefill's numbers do not depend on where chunks
  begin and end (measured bitwise on the default build: docs/decisions/0006-prefill.md), so
  the KV of a hit's prefix plus the rest prefilled is identical bit for bit to prefilling the
  whole prompt, and so is the answer. The tokens a sequence generated are not
  kept: one-token decode runs round differently from chunked prefill (int8 kernels), and the
  next turn, whose prompt holds that answer, must not depend on how it was computed.
- Matching is on token ids, never text: where a template renders earlier turns differently,
  the common prefix is just shorter.
- A hit copies the prefix and leaves the entry in place, so concurrent requests that share a
  prefix (one system prompt across users, a retried request) all hit it; a copy costs about
  1% of prefilling the same tokens. The entry of the conversation's previous turn is usually
  in the row the new turn is given: a long one (over `TAKE_OVER_TOKENS`, a conversation's
  history, rarely shared) is then taken over in place, with no copy; a short one (a system
  prompt, often shared) is moved to a spare row and stays an entry, so that requests sharing
  it that arrive a round later still hit (taking it over let the first of three concurrent
  requests consume it: the others missed).
- Every entry belongs to a scope (the server derives it from the API key): a prompt matches
  only entries of its own scope, so a request under another key can neither hit another's
  prefix nor time it.
- Entries live only in rows no running sequence needs: running sequences take rows first and
  an entry in the way moves, or is evicted, least recently used first.
Everything here runs on the engine's device thread. It changes the pool through the pool's
methods, and tells the engine where new sequences start instead of changing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.chat.kv_pool import KVPool
from inference.chat.sequence import Choice

TAKE_OVER_TOKENS = 512  # longer entries are taken over in place by the turn that extends them


@dataclass
class CacheEntry:
    tokens: list[int]  # the prompt prefix whose KV the row holds
    row: int
    used_at: int
    scope: str = ""  # who may reuse it: the requests of one API key


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    evictions: int = 0
    entries: int = 0
    tokens_held: int = 0


@dataclass
class PromptCache:
    """The entries, by row. `chunk` is the prefill chunk size: the unit of what is kept."""

    chunk: int
    enabled: bool = True
    max_tokens: int = 1 << 62  # what entries may hold together (the engine's byte cap)
    entries: list[CacheEntry] = field(default_factory=list)
    stats: CacheStats = field(default_factory=CacheStats)
    _clock: int = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def at(self, row: int) -> CacheEntry | None:
        return next((e for e in self.entries if e.row == row), None)

    def lookup(self, prompt: list[int], scope: str = "") -> tuple[CacheEntry | None, int]:
        """The entry of `scope` sharing the longest prefix with `prompt`, and how many tokens
        of it to reuse: whole chunks, leaving at least one prompt token to run."""
        best: CacheEntry | None = None
        best_len = 0
        for entry in self.entries:
            if entry.scope != scope:
                continue
            common = _common_prefix(entry.tokens, prompt)
            if common > best_len:
                best, best_len = entry, common
        usable = min(best_len, len(prompt) - 1) // self.chunk * self.chunk
        return (best, usable) if best is not None and usable > 0 else (None, 0)

    def record(self, hit: int) -> None:
        """Count one lookup that reused `hit` tokens (0: a miss)."""
        if hit:
            self.stats.hits += 1
            self.stats.tokens_reused += hit
        else:
            self.stats.misses += 1

    def keepable(self, prompt: list[int], written: int) -> list[int]:
        """The prefix of a leaving sequence worth keeping: its prompt's whole chunks that were
        written (a sequence cancelled mid-prefill keeps what it read)."""
        length = min(len(prompt), written) // self.chunk * self.chunk
        return prompt[:length] if self.enabled else []

    def add(self, tokens: list[int], row: int, scope: str = "") -> None:
        """Keep `tokens` in `row` for `scope`; entries of that scope it makes redundant (its
        own prefixes) go."""
        for entry in list(self.entries):
            if entry.scope == scope and len(entry.tokens) <= len(tokens) \
                    and tokens[:len(entry.tokens)] == entry.tokens:
                self.entries.remove(entry)
        self.entries.append(CacheEntry(tokens, row, self._tick(), scope))
        self._count()
        while self.stats.tokens_held > self.max_tokens:  # the oldest go; their rows are
            oldest = self.least_recent()  # trimmed by the engine
            if oldest is None:
                break
            self.remove(oldest, evicted=True)

    def touch(self, entry: CacheEntry) -> None:
        entry.used_at = self._tick()

    def remove(self, entry: CacheEntry, *, evicted: bool) -> None:
        self.entries.remove(entry)
        if evicted:
            self.stats.evictions += 1
        self._count()

    def least_recent(self, besides: CacheEntry | None = None) -> CacheEntry | None:
        candidates = [e for e in self.entries if e is not besides]
        return min(candidates, key=lambda e: e.used_at, default=None)

    def by_value(self) -> list[CacheEntry]:
        """Most recently used first (what a smaller pool keeps)."""
        return sorted(self.entries, key=lambda e: -e.used_at)

    # --- rows of the KV pool: running rows are 0..n-1, entries live above them ---------

    def keep(self, pool: KVPool, running: int, prompt: list[int], row: int,
             scope: str = "") -> None:
        """A sequence of `scope` leaves running row `row` (of `running`): keep its prompt's KV
        as an entry, out of the running rows (the pool then moves its last running row in)."""
        tokens = self.keepable(prompt, pool.used[row])
        if not tokens or len(tokens) > self.max_tokens:
            return
        target = row  # the last running row is the first spare one next
        if row != running - 1:
            spare = self._spare_row(pool, running)
            if spare is None:
                return
            pool.copy(row, spare, len(tokens))
            target = spare
        self.add(tokens, target, scope)

    def _spare_row(self, pool: KVPool, running: int, besides: CacheEntry | None = None
                   ) -> int | None:
        """A row no running sequence uses and no entry holds; else the least recently used
        entry's (evicted); None if there is neither."""
        held = {e.row for e in self.entries}
        free = next((r for r in range(running, pool.rows) if r not in held), None)
        if free is not None:
            return free
        victim = self.least_recent(besides)
        if victim is None:
            return None
        self.remove(victim, evicted=True)
        return victim.row

    def settle(self, pool: KVPool, rows: list[Choice]) -> list[tuple[Choice, int]]:
        """Before a run: entries in rows that new sequences were given are taken over in
        place (usually the conversation's previous turn) or moved away; the pool is shaped
        with the entries carried over; then new sequences copy their best prefix. Returns
        where each new sequence starts: the prompt tokens already in its row (0 on a miss),
        for the engine to record."""
        if not self.enabled:
            return []
        fresh = [c for c in rows if c.state == "prefill" and not c.looked_up]
        starts: dict[int, tuple[Choice, int]] = {}  # by id(choice)
        for row, choice in enumerate(rows):
            entry = self.at(row)
            if entry is None:
                continue
            if choice in fresh:
                best, usable = self.lookup(choice.prompt, choice.generation.cache_scope)
                shared = any(self.lookup(other.prompt, other.generation.cache_scope)[0] is entry
                             for other in fresh
                             if other is not choice and id(other) not in starts)
                if best is entry and not shared and len(entry.tokens) > TAKE_OVER_TOKENS:
                    # taken over in place, no copy
                    self.remove(entry, evicted=False)
                    self.record(usable)
                    pool.set_length(choice.row, usable)
                    starts[id(choice)] = (choice, usable)
                    continue
            target = self._spare_row(pool, len(rows), besides=entry)
            if target is None:
                self.remove(entry, evicted=True)
            else:
                pool.copy(row, target, len(entry.tokens))
                entry.row = target
        entries = self.by_value()
        kept = pool.ensure([(e.row, len(e.tokens)) for e in entries])
        for entry, moved in zip(entries, kept, strict=True):
            if moved is None:
                self.remove(entry, evicted=True)
            else:
                entry.row = moved
        for choice in fresh:
            if id(choice) in starts:
                continue
            best, usable = self.lookup(choice.prompt, choice.generation.cache_scope)
            self.record(usable)
            if best is not None:
                self.touch(best)
                pool.copy(best.row, choice.row, usable)
            starts[id(choice)] = (choice, usable)
        return list(starts.values())

    def _count(self) -> None:
        self.stats.entries = len(self.entries)
        self.stats.tokens_held = sum(len(e.tokens) for e in self.entries)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i:i + 64] == b[i:i + 64]:  # list slices compare in C
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i
