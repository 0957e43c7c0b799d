"""Failover on real processes: SIGKILL and SIGSTOP a node under load; nothing acknowledged
is lost, nothing is applied twice, no client is disconnected."""

from __future__ import annotations

import asyncio
import time

from loadtest.checker import IncrementLoad
from tests.integration.conftest import await_until, wait_until

PLAYERS = [f"f{i}" for i in range(200)]


def test_sigkill_under_load_loses_and_doubles_nothing(cluster):
    victim = "n2"
    displaced = [p for p in PLAYERS if cluster.owner(p) == victim]
    assert len(displaced) > 30

    async def main():
        load = IncrementLoad(cluster.url, {p: cluster.token(p) for p in PLAYERS}, record_times=True)
        await load.start()
        await load.wait_for_acks(2000, timeout=30)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.local.kill, victim)
        # Every displaced player is served again by its new owner.
        await await_until(
            lambda: all(any(t > killed_at for t in load.players[p].ack_times) for p in displaced),
            15,
            "displaced sessions served again",
        )
        await load.wait_for_acks(2000, timeout=30)
        assert load.disconnected() == []
        await load.stop()
        return load

    load = asyncio.run(main())
    status = cluster.gateway_status()
    assert status["membership"]["members"][victim] == "faulty"
    cluster.wait_flushed()
    assert load.mismatches(cluster.stored_xp) == {}
    assert sum(p.errors for p in load.players.values()) == 0


def test_sigstop_six_seconds_then_rejoin(cluster):
    victim = "n3"
    displaced = [p for p in PLAYERS if cluster.owner(p) == victim]

    async def main():
        load = IncrementLoad(cluster.url, {p: cluster.token(p) for p in PLAYERS}, record_times=True)
        await load.start()
        await load.wait_for_acks(2000, timeout=30)
        paused_at = time.monotonic()
        pause = asyncio.create_task(asyncio.to_thread(cluster.local.pause, victim, 6.0))
        # Served elsewhere while the node is stopped.
        await await_until(
            lambda: all(any(t > paused_at + 0.1 for t in load.players[p].ack_times) for p in displaced),
            6,
            "displaced sessions served while the node is paused",
        )
        assert not pause.done()
        await pause
        # The paused node learns it was declared faulty, drops its actors, rejoins.
        await asyncio.to_thread(
            wait_until,
            lambda: (
                cluster.node_status(victim)["dropped_all_activations"] >= 1
                and cluster.gateway_status()["membership"]["members"].get(victim) == "alive"
            ),
            15,
            "the paused node rejoins",
        )
        resumed_at = time.monotonic()
        await await_until(
            lambda: all(any(t > resumed_at for t in load.players[p].ack_times) for p in displaced),
            15,
            "sessions served after the node rejoined",
        )
        await load.wait_for_acks(1000, timeout=30)
        assert cluster.node_status(victim)["sessions"] == len(displaced)  # moved back to it
        assert load.disconnected() == []
        await load.stop()
        return load

    load = asyncio.run(main())
    cluster.wait_flushed()
    assert load.mismatches(cluster.stored_xp) == {}
