"""Sealed gossip (AES-GCM keyring), key rotation, and forged or replayed packets."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.gossip import GossipEndpoint
from server.swim import MemberState
from server.swim_codec import GossipDecodeError, Keyring, Member, Ping, Rumor, decode, encode
from tests.server.test_gossip import cluster, converged, until

K1, K2 = os.urandom(32), os.urandom(32)
PING = Ping(
    seq=1, sender="a", target="b", rumors=(Rumor(Member("c", ("127.0.0.1", 1), 3, MemberState.SUSPECT), "a"),)
)


def test_sealed_roundtrip_and_rotation():
    old, both, new_first, new = Keyring([K1]), Keyring([K1, K2]), Keyring([K2, K1]), Keyring([K2])
    assert decode(encode(PING, old), old) == PING
    # Step 1: everyone opens both, seals with K1. Step 2: some seal with K2; all still open.
    assert decode(encode(PING, both), old) == PING
    assert decode(encode(PING, new_first), both) == PING
    assert decode(encode(PING, new), new_first) == PING
    with pytest.raises(GossipDecodeError):
        decode(encode(PING, new), old)  # K1-only members cannot read K2 packets


def test_modes_do_not_mix_and_tampering_is_caught():
    ring = Keyring([K1])
    with pytest.raises(GossipDecodeError):
        decode(encode(PING, b"hmac-key"), ring)
    with pytest.raises(GossipDecodeError):
        decode(encode(PING, ring), b"hmac-key")
    sealed = bytearray(encode(PING, ring))
    sealed[20] ^= 1
    with pytest.raises(GossipDecodeError):
        decode(bytes(sealed), ring)
    with pytest.raises(ValueError):
        Keyring([b"short"])


@given(st.binary(max_size=300))
def test_garbage_only_raises_decode_error(data):
    with pytest.raises(GossipDecodeError):
        decode(data, Keyring([K1]))


def test_sealed_cluster_converges_and_shuts_out_a_wrong_key():
    async def main():
        ring = Keyring([K1])
        nodes = await cluster(3, key=ring)  # type: ignore[arg-type]
        intruder = GossipEndpoint(
            "intruder", "127.0.0.1", 0, key=Keyring([K2]), seeds=[nodes[0].addr], rng=random.Random(9)
        )
        await intruder.start()
        try:
            await until(lambda: converged(nodes, 3), 5.0, "3 sealed members converge")
            await until(lambda: nodes[0].dropped > 0, 5.0, "the intruder's packets are dropped")
            assert all("intruder" not in ep.swim.members for ep in nodes)
        finally:
            for ep in [*nodes, intruder]:
                await ep.stop()

    asyncio.run(main())


def test_forged_and_replayed_packets_cannot_kill_a_live_member():
    """An attacker without the key forges 'g2 is faulty'; one with captured packets replays
    an old suspicion of g2. Neither makes anyone declare live g2 faulty or adds a member."""

    async def main():
        ring = Keyring([K1])
        nodes = await cluster(3, key=ring)  # type: ignore[arg-type]
        try:
            await until(lambda: converged(nodes, 3), 5.0, "converge")
            g2 = nodes[2].swim.members["g2"]
            target = nodes[0].addr
            forged_member = Member("g2", g2.addr, g2.incarnation + 5, MemberState.FAULTY)
            ghost = Member("ghost", ("127.0.0.1", 9), 0, MemberState.ALIVE)
            forged = Ping(7, "g1", "g0", (Rumor(forged_member, "g1"), Rumor(ghost, "g1")))
            replay = encode(
                Ping(
                    8, "g1", "g0", (Rumor(Member("g2", g2.addr, g2.incarnation, MemberState.SUSPECT), "g1"),)
                ),
                ring,
            )
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(20):
                sock.sendto(encode(forged, Keyring([K2])), target)  # wrong key
                sock.sendto(encode(forged, b"guessed-hmac-key"), target)
                sock.sendto(replay, target)  # genuine, but old news
                await asyncio.sleep(0.02)
            sock.close()
            await asyncio.sleep(2.0)  # longer than suspicion_min: a successful attack would show
            for ep in nodes:
                assert ep.swim.members["g2"].state is MemberState.ALIVE, ep.name
                assert "ghost" not in ep.swim.members
            assert nodes[0].dropped >= 40
        finally:
            for ep in nodes:
                await ep.stop()

    asyncio.run(main())
