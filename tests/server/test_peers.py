"""Peers dialing on loopback TCP: which address a link to a node is opened to."""

from __future__ import annotations

import asyncio

import pytest

from server.peers import PeerLost, Peers


def test_a_learned_address_is_dialed_until_gossip_knows_one():
    async def main():
        accepted: list[int] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer.get_extra_info("sockname")[1])
            writer.close()

        servers = [await asyncio.start_server(accept, "127.0.0.1", 0) for _ in range(2)]
        learned, gossiped = (s.sockets[0].getsockname()[1] for s in servers)
        known: dict[str, tuple[str, int]] = {}
        peers = Peers(address_of=known.get, auth_key=b"k" * 32, max_frame=1 << 20, write_buffer=1 << 16)
        with pytest.raises(PeerLost):
            await peers.connect("n4", 1.0)  # nobody told us where n4 listens
        for bad in (None, "127.0.0.1:1", ["127.0.0.1"], ["127.0.0.1", "1"], ["127.0.0.1", 70000]):
            peers.learn("n4", bad)
            with pytest.raises(PeerLost):
                await peers.connect("n4", 1.0)
        peers.learn("n4", ["127.0.0.1", learned])  # n4's pull said so
        await peers.connect("n4", 1.0)
        known["n5"] = ("127.0.0.1", gossiped)
        peers.learn("n5", ["127.0.0.1", learned])
        await peers.connect("n5", 1.0)  # gossip's address wins
        for _ in range(100):
            if len(accepted) == 2:
                break
            await asyncio.sleep(0.01)
        assert accepted == [learned, gossiped]
        for s in servers:
            s.close()

    asyncio.run(main())
