"""Store against a real Redis: fenced writes on the writer connection and its recovery."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from loadtest.harness import free_ports
from server.cluster import redis_server_binary
from server.store import CAS_CHUNK, HANDOVER_SCRIPT, Store, StoreUnavailable, Write, epoch_key, state_key
from tests.integration.conftest import wait_until


class RedisProcess:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.dir), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, 10, "redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def _ready(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def on_store(url: str, scenario, **kw):
    """Run `scenario(store)` on a new Store, closed after; bounded, so that a write that
    hangs fails the test instead of stalling the suite."""

    async def main():
        store = Store(url, **kw)
        try:
            async with asyncio.timeout(30):
                return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


def writes(prefix: str, n: int, epoch: int = 1) -> list[Write]:
    return [Write(f"player:{prefix}{i}", epoch, f"state {prefix}{i}".encode()) for i in range(n)]


def set_epochs(r: redis.Redis, batch: list[Write], epoch: int = 1) -> None:
    for w in batch:
        r.set(epoch_key(w.key), epoch)


async def start_a_held_write(store: Store, batch: list[Write], r: redis.Redis) -> asyncio.Task[list[bool]]:
    """A write whose reply Redis holds back (CLIENT PAUSE, 300 ms). The 50 ms wait lets it
    leave for Redis first; were it still unsent, the tests using this would pass without
    exercising their case, never fail for it."""
    r.execute_command("CLIENT", "PAUSE", 300, "ALL")
    task = asyncio.create_task(store.write_batch(batch))
    await asyncio.sleep(0.05)
    return task


def test_fenced_writes_over_several_chunks_land_only_under_the_current_epoch(rds):
    r = rds.client()
    batch = writes("a", 2 * CAS_CHUNK + 5)
    set_epochs(r, batch)
    r.set(epoch_key(batch[7].key), 2)  # a newer activation elsewhere fenced this one

    async def scenario(store):
        return await store.write_batch(batch)

    results = on_store(rds.url, scenario)
    assert results == [i != 7 for i in range(len(batch))]
    assert r.get(state_key(batch[7].key)) is None
    assert r.get(state_key(batch[-1].key)) == batch[-1].blob


def test_a_writer_connection_killed_while_idle_is_replaced_without_a_failed_flush(rds):
    r = rds.client()
    batch = writes("b", 3)
    set_epochs(r, batch)

    async def scenario(store):
        assert await store.write_batch(batch) == [True] * 3
        killed = r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        assert await store.write_batch(batch) == [True] * 3

    on_store(rds.url, scenario)


def test_pool_connections_killed_while_idle_are_replaced_without_a_failed_activation(rds):
    """After a Redis restart every idle pool connection is dead: each failed its next command
    (activations, hand-overs, revocation checks) until redis-py was told to retry once."""
    r = rds.client()

    async def scenario(store):
        first = await asyncio.gather(*(store.activate(f"player:k{i}") for i in range(8)))
        assert all(epoch >= 1 for epoch, _ in first)
        killed = r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        again = await asyncio.gather(*(store.activate(f"player:k{i}") for i in range(8)))
        assert [e for e, _ in again] == [e + 1 for e, _ in first]
        assert not await store.is_revoked("some-token-id")

    on_store(rds.url, scenario)


def test_a_script_cache_flushed_by_a_restart_is_loaded_again(rds):
    r = rds.client()
    batch = writes("c", 2)
    set_epochs(r, batch)

    async def scenario(store):
        assert await store.write_batch(batch) == [True, True]
        r.script_flush()
        assert await store.write_batch(writes("c", 2)) == [True, True]

    on_store(rds.url, scenario)


def test_redis_down_raises_store_unavailable_and_writes_resume_when_it_is_back(rds):
    batch = writes("d", 2)
    set_epochs(rds.client(), batch)

    async def scenario(store):
        assert await store.write_batch(batch) == [True, True]
        rds.stop()
        with pytest.raises(StoreUnavailable):
            await store.write_batch(batch)
        rds.start()
        set_epochs(rds.client(), batch)  # no persistence: the restart lost the epochs
        assert await store.write_batch(batch) == [True, True]

    on_store(rds.url, scenario, timeout=1.0)


def test_a_write_cancelled_before_its_reply_does_not_put_the_next_write_out_of_step(rds):
    r = rds.client()
    first = writes("e", 3)
    set_epochs(r, first)
    stale = writes("f", 1, epoch=1)
    set_epochs(r, stale, epoch=5)  # refused: the one reply is [0]

    async def scenario(store):
        assert await store.write_batch(first) == [True] * 3
        task = await start_a_held_write(store, first, r)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Over the old connection this would read the cancelled write's [1, 1, 1].
        assert await store.write_batch(stale) == [False]

    on_store(rds.url, scenario)


def test_a_hand_over_on_a_fresh_redis_takes_each_epoch_once(rds):
    r = rds.client()
    batch = writes("g", CAS_CHUNK + 3)
    set_epochs(r, batch)

    async def scenario(store):
        return await store.hand_over(batch)  # first use: the script is not cached yet

    assert on_store(rds.url, scenario) == [2] * len(batch)
    assert {int(r.get(epoch_key(w.key))) for w in batch} == {2}
    assert r.get(state_key(batch[-1].key)) == batch[-1].blob


def test_a_script_lost_between_chunks_redoes_only_the_chunks_that_did_not_run(rds):
    r = rds.client()
    batch = writes("h", 2 * CAS_CHUNK + 3)  # three chunks
    set_epochs(r, batch)
    r.script_load(HANDOVER_SCRIPT)

    async def scenario(store):
        real = store._run_pipelined
        first = True

        async def flush_after_the_first_chunk(calls):
            nonlocal first
            if not first:
                return await real(calls)
            first = False  # a restart's empty script cache, between chunk 1 and chunk 2
            out = await real([calls[0], ("SCRIPT", "FLUSH"), *calls[1:]])
            return [out[0], *out[2:]]

        store._run_pipelined = flush_after_the_first_chunk
        return await store.hand_over(batch)

    assert on_store(rds.url, scenario) == [2] * len(batch)  # the first chunk's epochs, taken once
    assert {int(r.get(epoch_key(w.key))) for w in batch} == {2}
    # Loaded with SCRIPT LOAD (kept), not EVAL (evictable from Redis 7.4 on).
    stats = r.info("commandstats")
    assert "cmdstat_script" in stats and "cmdstat_eval" not in stats, sorted(stats)


def test_a_hung_redis_gives_store_unavailable_within_the_timeout(rds):
    batch = writes("i", 2)
    set_epochs(rds.client(), batch)

    async def scenario(store):
        assert await store.write_batch(batch) == [True, True]
        os.kill(rds.proc.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(5):
                with pytest.raises(StoreUnavailable):
                    await store.write_batch(batch)
        finally:
            os.kill(rds.proc.pid, signal.SIGCONT)
        assert await store.write_batch(batch) == [True, True]

    on_store(rds.url, scenario, timeout=1.0)


@pytest.mark.parametrize("first_write", [False, True], ids=["reused connection", "new connection"])
def test_closing_the_store_during_a_write_leaves_no_connection_open(rds, first_write):
    r = rds.client()
    batch = writes("j", 3)
    set_epochs(r, batch)

    async def scenario(store):
        if not first_write:
            assert await store.write_batch(batch) == [True] * 3
        task = await start_a_held_write(store, batch, r)
        await store.close()  # on_store closes it again: a second close is harmless
        with pytest.raises(StoreUnavailable):
            await task

    on_store(rds.url, scenario)
    # Redis frees a client whose socket closed at the end of its event loop iteration,
    # so a CLIENT LIST sent just after the close may still name it.
    wait_until(lambda: len(r.client_list()) == 1, 2.0, "only this test's own client is left")


def test_an_activation_whose_caller_gave_up_takes_no_epoch(rds):
    """A caller that timed out before its activation left must not take an epoch: it
    would fence a hand-over that the key's next activation may take meanwhile."""

    async def scenario(store):
        gave_up = asyncio.ensure_future(store.activate("player:gone"))
        await asyncio.sleep(0)  # it is queued for this iteration's pipeline
        gave_up.cancel()
        assert await store.activate("player:kept") == (1, None)
        return gave_up.cancelled()

    assert on_store(rds.url, scenario)
    r = rds.client()
    assert r.get(epoch_key("player:gone")) is None
    assert r.get(epoch_key("player:kept")) == b"1"


def test_drain_claims_leave_one_node_serving_until_they_expire_or_are_cleared(rds):
    async def scenario(store):
        # Each drainer's gossip view still counts the others as serving; the claims do not:
        # n1 and n2 go (n3 still serves), n3 is refused unless forced.
        assert await store.claim_drain("n1", ["n2", "n3"], ttl_s=30, force=False) == (True, ["n2", "n3"])
        assert await store.claim_drain("n2", ["n1", "n3"], ttl_s=30, force=False) == (True, ["n3"])
        assert await store.claim_drain("n3", ["n1", "n2"], ttl_s=30, force=False) == (False, [])
        assert await store.claim_drain("n3", ["n1", "n2"], ttl_s=30, force=True) == (True, [])
        await store.clear_drain_claim("n1")  # n1 started again
        assert await store.claim_drain("n4", ["n1", "n2"], ttl_s=0.2, force=False) == (True, ["n1"])
        await asyncio.sleep(0.3)  # past n4's claim (0.2 s on Redis's clock): it serves again
        assert await store.claim_drain("n2", ["n4"], ttl_s=30, force=False) == (True, ["n4"])

    on_store(rds.url, scenario)


def test_new_connections_leave_no_reference_cycle(rds):
    """redis-py 8 sent every new connection CLIENT SETINFO twice and asked for maintenance
    notices, which this Redis (6.2) refuses; each refusal stayed in a reference cycle with
    its traceback and frames (284 objects here; a node's census found 47 after a burst of
    new connections, and a test that counts what a collection frees failed)."""

    async def scenario(store):
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(store.activate(f"player:c{i}") for i in range(4)))
            await asyncio.gather(*(store.is_revoked(f"t{i}") for i in range(8)))  # several at once
            return gc.collect()
        finally:
            gc.enable()

    assert on_store(rds.url, scenario) == 0
