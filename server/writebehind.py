"""Write-behind bookkeeping, sans-I/O: which actors are dirty, when to flush, retry backoff.

The persister adapter asks `take_batch(now)` for keys to write, writes their
current snapshots, and reports back with `flushed()` or `failed()`. Many
updates to one actor between flushes coalesce into one write because the
dirty set holds each key once.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable


class DirtySetFull(Exception):
    """The dirty-set bound is reached (Redis is away); refuse the write."""


class WriteBehind:
    def __init__(
        self,
        *,
        interval: float,
        batch_max: int,
        max_dirty: int,
        retry_base: float,
        retry_cap: float,
        rng: random.Random,
        now: float,
    ) -> None:
        self.interval = interval
        self.batch_max = batch_max
        self.max_dirty = max_dirty
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._rng = rng
        self._dirty: dict[Hashable, None] = {}  # insertion order: oldest first
        self._in_flight: set[Hashable] = set()
        # Dirty or in flight (or both): asked on every update, so kept, not computed.
        self._unsettled: set[Hashable] = set()
        self._next_flush = now + interval
        self._failures = 0  # consecutive failed flushes
        self._retry_at = 0.0  # after a failed flush: not before this
        self._urgent = False  # someone waits for a write: flush without waiting for the period

    def __len__(self) -> int:
        """Actors whose latest state is not yet known to be durable."""
        return len(self._unsettled)

    @property
    def degraded(self) -> bool:
        return self._failures > 0

    @property
    def next_flush(self) -> float:
        return self._next_flush

    def is_dirty(self, key: Hashable) -> bool:
        return key in self._unsettled

    def can_accept(self, key: Hashable) -> bool:
        return self.is_dirty(key) or len(self) < self.max_dirty

    def mark_dirty(self, key: Hashable, *, urgent: bool = False) -> None:
        """Note that `key` changed. `urgent`: a caller waits for this write (group commit)."""
        if key not in self._dirty:
            if key not in self._unsettled:
                if len(self._unsettled) >= self.max_dirty:
                    raise DirtySetFull(f"{len(self)} actors wait for Redis")
                self._unsettled.add(key)
            self._dirty[key] = None
        if urgent and not self._failures:
            self._urgent = True

    def hurry(self) -> None:
        """Flush what is dirty now rather than at the next period (unless backing off)."""
        if self._dirty and not self._failures:
            self._urgent = True

    def due(self, now: float) -> bool:
        return bool(self._dirty) and (self._urgent or now >= self._next_flush)

    def take_batch(self, now: float) -> list[Hashable]:
        """Keys to write now (at most batch_max); empty when nothing is due."""
        if not self.due(now):
            return []
        batch: list[Hashable] = []
        for key in self._dirty:
            if key in self._in_flight:
                continue  # a write of it is under way; it goes in the next batch
            batch.append(key)
            if len(batch) >= self.batch_max:
                break
        for key in batch:
            del self._dirty[key]
            self._in_flight.add(key)
        if batch:
            self._urgent = False
        if batch and not self._dirty.keys() - self._in_flight:
            self._next_flush = now + self.interval
        return batch

    @property
    def retry_at(self) -> float:
        """After a failed write, when the backoff allows the next (0 once one succeeded)."""
        return self._retry_at

    def flushed(self, keys: Iterable[Hashable]) -> None:
        dirty = self._dirty
        for key in keys:
            self._in_flight.discard(key)
            if key not in dirty:  # not changed again while it was written
                self._unsettled.discard(key)
        self._failures = 0
        self._retry_at = 0.0

    def failed(self, keys: Iterable[Hashable], now: float) -> float:
        """The write of `keys` failed; they stay dirty. Returns the retry delay chosen."""
        for key in keys:
            if key in self._in_flight:  # (one a batch skipped, or wrote, is not dirty again)
                self._in_flight.discard(key)
                self._dirty[key] = None  # unsettled still: it was in flight
        self._failures += 1
        # The exponent stops growing once the cap is reached: 2**1024 is past a float, and an
        # outage can last that many retries.
        delay = self._rng.uniform(0, min(self.retry_cap, self.retry_base * 2 ** min(self._failures, 60)))
        self._next_flush = self._retry_at = now + max(delay, 0.001)
        return delay

    def unsent(self, keys: Iterable[Hashable]) -> None:
        """The write of `keys` was abandoned (the persister stopped): dirty again, no
        failure counted."""
        for key in keys:
            if key in self._in_flight:
                self._in_flight.discard(key)
                self._dirty[key] = None

    def skipped(self, key: Hashable) -> None:
        """The batch that took `key` does not write it (no activation to write): it is
        neither in flight nor dirty any more."""
        self._dirty.pop(key, None)
        self._in_flight.discard(key)
        self._unsettled.discard(key)

    def discard(self, key: Hashable) -> None:
        """Forget `key` without writing it (a stale activation)."""
        self._dirty.pop(key, None)
        # A write of it under way stays in flight until it returns: a newer activation's
        # changes wait for the next batch, never ride on (or race) the old write.
        if key not in self._in_flight:
            self._unsettled.discard(key)
