"""The persister's bookkeeping when activations come and go while a write is under way.

The store here stands in for Redis's compare-and-set: a write whose epoch is below
`fence` is refused, as the CAS script refuses a stale epoch; a gate holds a write open (the
real script is tested against a real Redis in tests/integration/test_write_behind.py)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from server.config import NodeSettings
from server.persister import Persister
from server.player import PlayerState
from server.runtime import ActorRuntime
from server.store import StoreUnavailable
from server.writebehind import WriteBehind


class FencedStore:
    def __init__(self, fence: int = 0, fail_first: bool = False) -> None:
        self.gate = asyncio.Event()
        self.fence = fence
        self.fail_first = fail_first
        self.written: list[tuple[str, int]] = []
        self.started = 0

    async def write_batch(self, writes):
        self.started += 1
        await self.gate.wait()
        if self.fail_first:
            self.fail_first = False
            raise StoreUnavailable("redis went away")
        self.written += [(w.key, w.epoch) for w in writes if w.epoch >= self.fence]
        return [w.epoch >= self.fence for w in writes]


def make(store: FencedStore):
    wb = WriteBehind(
        interval=0.05, batch_max=10, max_dirty=10, retry_base=0.01, retry_cap=0.05,
        rng=random.Random(1), now=time.monotonic(),
    )  # fmt: skip
    deactivated: list[tuple[int, bool]] = []
    runtime = ActorRuntime(
        store,  # type: ignore[arg-type]
        wb,
        NodeSettings(),
        clock=time.monotonic,
        load=lambda key, blob: PlayerState.from_blob(blob, default_name=key),
        on_activated=lambda act: None,
        on_deactivated=lambda act, stale, moved_to: deactivated.append((act.epoch, stale)),
    )
    persister = Persister(store, wb, runtime, clock=time.monotonic, on_durable=lambda act: None)  # type: ignore[arg-type]
    return wb, runtime, persister, deactivated


def one_dirty_player(store: FencedStore):
    """A persister over `store` with one active player, `player:a`, dirty."""
    wb, runtime, persister, _ = make(store)
    runtime.adopt("player:a", 1, PlayerState("a").to_blob())
    wb.mark_dirty("player:a")
    return wb, runtime, persister


async def run_loop_until(persister: Persister, condition, timeout: float, what: str) -> None:
    """Run the flush loop until `condition()` holds (failing past `timeout` or if the loop
    ends), then stop it."""
    task = asyncio.create_task(persister.run())
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and not task.done(), (what, task)
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_refused_write_of_a_dropped_activation_leaves_the_newer_one_alone():
    async def main():
        store = FencedStore(fence=3)
        wb, runtime, persister, deactivated = make(store)
        runtime.adopt("player:a", 1, PlayerState("a").to_blob())
        wb.mark_dirty("player:a")
        writing = asyncio.create_task(persister.flush_all(deadline=time.monotonic() + 1))
        await asyncio.sleep(0.01)  # epoch 1's write is under way
        runtime.drop_all()
        runtime.adopt("player:a", 3, PlayerState("a").to_blob())  # a newer activation
        wb.mark_dirty("player:a")
        store.gate.set()  # epoch 1's write is refused
        await writing
        assert deactivated == [(1, True)], "only the old activation went (drop_all)"
        assert runtime.actors["player:a"].epoch == 3
        assert await persister.flush_all(deadline=time.monotonic() + 1)
        assert store.written == [("player:a", 3)], "the newer activation's change was written"

    asyncio.run(main())


def test_a_key_dropped_during_a_failed_write_is_written_for_its_next_activation():
    async def main():
        store = FencedStore(fail_first=True)
        wb, runtime, persister, _ = make(store)
        runtime.adopt("player:a", 1, PlayerState("a").to_blob())
        wb.mark_dirty("player:a")
        writing = asyncio.create_task(persister.flush_all(deadline=time.monotonic() + 0.2))
        await asyncio.sleep(0.01)  # the write is under way
        runtime.drop_all()  # the stall watchdog, or the end of a drain
        store.gate.set()  # ...and the write fails
        await writing
        assert await persister.flush_all(deadline=time.monotonic() + 1), "nothing is left pending"
        assert len(wb) == 0
        runtime.adopt("player:a", 2, PlayerState("a").to_blob())  # the player comes back
        wb.mark_dirty("player:a")
        assert await persister.flush_all(deadline=time.monotonic() + 1)
        assert store.written == [("player:a", 2)]
        assert runtime.passivate("player:a"), "clean, so it can go"

    asyncio.run(main())


def test_a_write_stopped_midway_leaves_its_keys_to_the_final_flush():
    """Shutdown cancels the flush loop, maybe mid-write; the final flush_all must still
    write what that write carried."""

    async def main():
        store = FencedStore()
        wb, runtime, persister = one_dirty_player(store)
        await run_loop_until(persister, lambda: store.started, 2, "the loop began a write")
        store.gate.set()
        assert await persister.flush_all(deadline=time.monotonic() + 1)
        assert store.written == [("player:a", 1)]

    asyncio.run(main())


def test_the_flush_loop_yields_while_what_is_due_is_in_another_write():
    """A drain's flush_all writes a key; a session changes it meanwhile, and its next flush
    falls due: the loop finds nothing to take (the key is in flight) and must wait, not
    spin, or the write it waits for never returns. Run apart: a spinning loop hangs."""
    script = textwrap.dedent(
        """
        import asyncio, sys, time
        sys.path.insert(0, "tests/server")
        from test_persister import FencedStore, make
        from server.player import PlayerState

        async def main():
            store = FencedStore()
            wb, runtime, persister, _ = make(store)
            loop_task = asyncio.create_task(persister.run())
            runtime.adopt("player:a", 1, PlayerState("a").to_blob())
            wb.mark_dirty("player:a")
            draining = asyncio.create_task(persister.flush_all(deadline=time.monotonic() + 5))
            await asyncio.sleep(0.01)  # its write is in flight
            wb.mark_dirty("player:a")
            await asyncio.sleep(0.2)  # past the next flush
            store.gate.set()
            assert await draining
            loop_task.cancel()
            print("ok")

        asyncio.run(main())
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=20
    )
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


class FlakyStore(FencedStore):
    """Fails its first `n` writes: with StoreUnavailable (an outage) or another error (a bug)."""

    def __init__(self, n: int, error: Exception) -> None:
        super().__init__()
        self.gate.set()
        self.failures_left = n
        self.error = error
        self.attempts: list[float] = []

    async def write_batch(self, writes):
        self.attempts.append(time.monotonic())
        if self.failures_left:
            self.failures_left -= 1
            raise self.error
        return await super().write_batch(writes)


def test_an_unexpected_write_error_keeps_the_state_dirty_and_the_loop_running():
    async def main():
        store = FlakyStore(2, RuntimeError("a bug in the write path"))
        wb, runtime, persister = one_dirty_player(store)
        await run_loop_until(persister, lambda: store.written, 3, "written after two failures")
        assert store.written == [("player:a", 1)] and len(wb) == 0
        assert persister.loop_errors_total == 2

    asyncio.run(main())


def test_the_final_flush_waits_out_the_backoff_instead_of_hammering_redis():
    async def main():
        store = FlakyStore(10**9, StoreUnavailable("connection refused"))  # Redis stays away
        wb, runtime, persister = one_dirty_player(store)
        assert not await persister.flush_all(deadline=time.monotonic() + 0.5)
        # Backoff capped at 50 ms (retry_cap): about 0.5 s / 25 ms on average, not thousands.
        assert 3 <= len(store.attempts) <= 60, len(store.attempts)
        assert wb.is_dirty("player:a")

    asyncio.run(main())


def test_a_state_that_fails_to_serialize_once_is_not_left_in_flight():
    """A bug before the write (here: building the blob) must leave the key dirty, so that
    the next flush writes it once the bug has passed."""

    class Brittle(PlayerState):
        __slots__ = ("fail",)

        def to_blob(self) -> bytes:
            if self.fail:
                self.fail = False
                raise TypeError("not serializable this once")
            return super().to_blob()

    async def main():
        store = FlakyStore(0, RuntimeError())
        wb, runtime, persister, _ = make(store)
        runtime.adopt("player:a", 1, PlayerState("a").to_blob())
        state = Brittle("a")
        state.fail = True
        runtime.actors["player:a"].data = state
        wb.mark_dirty("player:a")
        # The first take fails on the blob; the key must come back, and be written after.
        assert await persister.flush_all(deadline=time.monotonic() + 1)
        assert persister.loop_errors_total == 1 and store.written == [("player:a", 1)]

    asyncio.run(main())


def test_the_flush_loop_outlives_an_error_of_its_own():
    async def main():
        store = FlakyStore(0, RuntimeError())
        wb, runtime, persister = one_dirty_player(store)
        real = persister.flush_due
        calls = []

        async def broken_once() -> bool:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the loop")
            return await real()

        persister.flush_due = broken_once  # type: ignore[method-assign]
        await run_loop_until(persister, lambda: store.written, 3, "written after the loop's error")
        assert persister.loop_errors_total == 1 and len(calls) >= 2

    asyncio.run(main())


def test_the_final_flush_does_not_wait_a_period_after_a_recovered_outage():
    """A drain's `flush_all` starts while the flush loop's first write after an outage is
    still in flight (the last write failed, the next flush is a whole period away): it must
    wait for that write, not for the period."""

    async def main():
        store = FencedStore(fail_first=True)
        wb, runtime, persister = one_dirty_player(store)
        wb.interval = 30.0  # waiting for the period would miss the deadline
        store.gate.set()
        await persister._write(wb.take_batch(wb.next_flush))  # the outage: it fails
        assert wb.degraded and wb.is_dirty("player:a")
        await asyncio.sleep(max(0.0, wb.retry_at - time.monotonic()))
        store.gate.clear()
        in_flight = asyncio.create_task(persister._write(wb.take_batch(wb.next_flush)))
        asyncio.get_running_loop().call_later(0.2, store.gate.set)
        started = time.monotonic()
        assert await persister.flush_all(deadline=started + 2)
        assert time.monotonic() - started < 1
        await in_flight
        assert store.written == [("player:a", 1)]

    asyncio.run(main())
