"""The write-behind adapter: takes batches from WriteBehind, writes snapshots through Store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.runtime import Activation, ActorRuntime, ActorState
from server.store import Store, StoreUnavailable, Write
from server.writebehind import WriteBehind

log = logging.getLogger("ringside.persister")

_WRITABLE = (ActorState.ACTIVE, ActorState.MIGRATING)  # a frozen state may still be written


class Persister:
    def __init__(
        self,
        store: Store,
        write_behind: WriteBehind,
        runtime: ActorRuntime,
        *,
        clock: Callable[[], float],
        on_durable: Callable[[Activation], None],
    ) -> None:
        self._store = store
        self._wb = write_behind
        self._runtime = runtime
        self._clock = clock
        self._on_durable = on_durable
        self.flushes_total = 0
        self.states_written_total = 0
        self.redis_errors_total = 0
        self.last_flush_duration = 0.0
        self.last_success = clock()
        self._wake = asyncio.Event()
        self._stuck = False  # the flush loop found due work all in flight in another write
        self.loop_errors_total = 0  # unexpected errors the flush loop survived (bugs)
        self.on_flushed: Callable[[float], None] = lambda seconds: None  # metrics hook

    def kick(self) -> None:
        """Flush now instead of at the next period (shutdown, drain)."""
        self._wake.set()

    async def run(self) -> None:
        interval = self._wb.interval
        while True:
            now = self._clock()
            # Sleep to the next flush; with nothing dirty, a whole interval (or a kick). Also
            # when the last round was due but found nothing to take: what is dirty is in
            # flight (a flush_all's write), and trying again at once would spin without ever
            # letting that write return; its return wakes us (see _write).
            due = not self._stuck and self._wb.due(self._wb.next_flush)
            delay = self._wb.next_flush - now if due else interval
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(delay, 0.001)):  # no task per wait
                        await self._wake.wait()
            self._wake.clear()
            now = self._clock()
            try:
                wrote = await self.flush_due()
            except Exception:
                # A bug here must not end write-behind silently while clients get `ok`.
                log.exception("flush loop failed; retrying after a period")
                self.loop_errors_total += 1
                await asyncio.sleep(interval)
                continue
            self._stuck = not wrote and self._wb.due(now)

    async def flush_due(self) -> bool:
        """Write what is due; False when there was nothing to take."""
        wrote = False
        while batch := self._wb.take_batch(self._clock()):
            wrote = True
            await self._write(batch)
        return wrote

    async def flush_all(self, *, deadline: float) -> bool:
        """Write every dirty actor now, retrying until `deadline`. True when nothing is left."""
        while len(self._wb) and self._clock() < deadline:
            wait = min(self._wb.retry_at, deadline) - self._clock()
            if wait > 0:  # a write failed: wait out its backoff, do not hammer Redis
                await asyncio.sleep(wait)
                continue
            batch = self._wb.take_batch(max(self._clock(), self._wb.next_flush))
            if batch:
                await self._write(batch)
            else:
                await asyncio.sleep(0.01)
        return not len(self._wb)

    async def _write(self, keys: list) -> None:
        try:
            await self._write_taken(keys)
        except Exception:
            # Not an outage we know of (a bug, an unexpected reply): what is still in flight
            # goes back to dirty and is retried after a backoff, never left in flight for good.
            self.loop_errors_total += 1
            self._wb.failed(keys, self._clock())
            log.exception("flush failed unexpectedly; state kept in memory", extra={"actors": len(keys)})

    async def _write_taken(self, keys: list) -> None:
        acts: list[Activation] = []
        writes: list[Write] = []
        seqs: list[int] = []
        versions: list[int] = []
        for key in keys:
            act = self._runtime.actors.get(key)
            if act is None or act.state not in _WRITABLE:
                self._wb.skipped(key)
                continue
            acts.append(act)
            seqs.append(getattr(act.data, "applied_seq", 0))
            versions.append(act.version)
            writes.append(Write(key, act.epoch, act.data.to_blob()))
        if not writes:
            return
        started = time.perf_counter()
        try:
            results = await self._store.write_batch(writes)
        except asyncio.CancelledError:
            self._wb.unsent([a.key for a in acts])  # stopped mid-write: dirty, not in flight
            raise
        except StoreUnavailable as exc:
            self.redis_errors_total += 1
            delay = self._wb.failed([a.key for a in acts], self._clock())
            log.warning(
                "flush failed; state kept in memory",
                extra={"actors": len(acts), "retry_in_s": round(delay, 3), "error": str(exc)},
            )
            return
        finally:
            if self._stuck:
                self._wake.set()  # the flush loop waited for a write like this one to return
        self._wb.flushed([a.key for a in acts])  # first: nothing below may leave them in flight
        self.last_flush_duration = time.perf_counter() - started
        self.on_flushed(self.last_flush_duration)
        self.last_success = self._clock()
        self.flushes_total += 1
        for act, seq, version, ok in zip(acts, seqs, versions, results, strict=True):
            if ok:
                self.states_written_total += 1
                act.flushed_seq = max(act.flushed_seq, seq)
                act.durable_upto(version, True)
                self._on_durable(act)
            elif self._runtime.actors.get(act.key) is act:  # not a newer activation of it
                self._runtime.drop_stale(act.key)
