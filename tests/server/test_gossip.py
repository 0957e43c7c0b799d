"""Real GossipEndpoints on loopback UDP/TCP in one event loop."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable

from server.gossip import GossipEndpoint
from server.swim import MemberEvent, MemberState
from server.swim_codec import Nack, encode

KEY = b"test-cluster-key"


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until it holds; fail after ``timeout``. Returns the time it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def cluster(n: int, *, key: bytes = KEY) -> list[GossipEndpoint]:
    first = GossipEndpoint("g0", "127.0.0.1", 0, key=key, meta={"role": "node"}, rng=random.Random(0))
    await first.start()
    nodes = [first]
    for i in range(1, n):
        ep = GossipEndpoint(
            f"g{i}",
            "127.0.0.1",
            0,
            key=key,
            seeds=[first.addr],
            meta={"role": "node", "i": i},
            rng=random.Random(i),
        )
        await ep.start()
        nodes.append(ep)
    return nodes


def converged(nodes: list[GossipEndpoint], size: int) -> bool:
    sums = {ep.swim.checksum() for ep in nodes}
    return len(sums) == 1 and all(len(ep.swim.live_members()) == size for ep in nodes)


async def _converges_and_detects_a_stopped_member() -> None:
    seen: list[MemberEvent] = []
    nodes = await cluster(4)
    nodes[1]._on_event = seen.append
    try:
        await until(lambda: converged(nodes, 4), 5.0, "4 members converge")
        assert nodes[2].swim.members["g3"].meta == {"role": "node", "i": 3}
        victim, rest = nodes[3], nodes[:3]
        await victim.stop()
        took = await until(
            lambda: all(ep.swim.members["g3"].state is MemberState.FAULTY for ep in rest),
            8.0,
            "survivors mark g3 FAULTY",
        )
        print(f"\nloopback: stopped member FAULTY everywhere after {took:.2f}s")
        assert all(ep.swim.members[n].state is MemberState.ALIVE for ep in rest for n in ("g0", "g1", "g2"))
        assert any(ev.member.name == "g3" and ev.member.state is MemberState.FAULTY for ev in seen)
    finally:
        for ep in nodes:
            await ep.stop()


async def _graceful_leave_and_event_stream() -> None:
    nodes = await cluster(3)
    try:
        await until(lambda: converged(nodes, 3), 5.0, "3 members converge")
        events: list[MemberEvent] = []

        async def consume() -> None:
            async for ev in nodes[0].events():
                events.append(ev)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)
        assert await nodes[2].leave(timeout=5.0)
        await nodes[0].wait_until(lambda s: s.members["g2"].state is MemberState.LEFT, 3.0)
        await until(lambda: any(e.member.state is MemberState.LEFT for e in events), 1.0, "LEFT event")
        consumer.cancel()
        assert [e.member.state for e in events if e.member.name == "g2"][-1] is MemberState.LEFT
        assert not any(e.member.state is MemberState.FAULTY for e in events)
    finally:
        for ep in nodes:
            await ep.stop()


async def _bad_packets_dropped_and_foreign_key_cannot_join() -> None:
    nodes = await cluster(2)
    stranger = GossipEndpoint(
        "evil", "127.0.0.1", 0, key=b"other-key", seeds=[nodes[0].addr], rng=random.Random(9)
    )
    await stranger.start()
    try:
        await until(lambda: converged(nodes, 2), 5.0, "2 members converge")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00garbage" * 10, nodes[0].addr)
            s.sendto(encode(Nack(1, "x"), b"wrong"), nodes[0].addr)
        await until(lambda: nodes[0].dropped >= 3, 3.0, "garbage and foreign packets dropped")
        assert "evil" not in nodes[0].swim.members and "evil" not in nodes[1].swim.members
        assert converged(nodes, 2)
    finally:
        for ep in [*nodes, stranger]:
            await ep.stop()


# pytest-asyncio is not a dependency: each test drives its own event loop.


def test_cluster_converges_and_detects_a_stopped_member() -> None:
    asyncio.run(_converges_and_detects_a_stopped_member())


def test_graceful_leave_and_event_stream() -> None:
    asyncio.run(_graceful_leave_and_event_stream())


def test_bad_packets_are_dropped_and_foreign_key_cannot_join() -> None:
    asyncio.run(_bad_packets_dropped_and_foreign_key_cannot_join())


def test_membership_status_answers_before_gossip_starts() -> None:
    """A process's admin server answers /status from before its gossip endpoint starts; that
    must not be a 500."""
    from server.config import ClusterConfig
    from server.membership import Membership

    membership = Membership(ClusterConfig(), name="n1", host="127.0.0.1", port=1, meta={"role": "node"})
    status = membership.status()
    assert status["state"] == "starting" and status["members"] == {} and status["ring"] == {}
