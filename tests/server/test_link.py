"""Node links on loopback: authentication, sealing, and what a wrong key gets."""

from __future__ import annotations

import asyncio
import os

from server.link import Link
from server.swim_codec import Keyring
from server.wire import Frame, Kind

AUTH = b"link-auth-key"
RING = Keyring([os.urandom(32)])


async def pair(*, dialer_auth=AUTH, dialer_ring=RING, acceptor_ring=RING):
    loop = asyncio.get_running_loop()
    received: list[Frame] = []
    lost = asyncio.Event()
    wire: list[bytes] = []

    def accept() -> Link:
        link = Link(
            lambda _l, frames: received.extend(frames),
            lambda _l: lost.set(),
            max_frame=1 << 16,
            write_buffer=1 << 16,
            auth_key=AUTH,
            accepting=True,
            keyring=acceptor_ring,
        )
        original = link.data_received

        def spy(data: bytes) -> None:
            wire.append(data)
            original(data)

        link.data_received = spy  # type: ignore[method-assign]
        return link

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, dialer = await loop.create_connection(
        lambda: Link(
            lambda _l, _f: None,
            lambda _l: None,
            max_frame=1 << 16,
            write_buffer=1 << 16,
            auth_key=dialer_auth,
            accepting=False,
            keyring=dialer_ring,
        ),
        "127.0.0.1",
        port,
    )
    return server, dialer, received, lost, wire


async def until(cond, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_sealed_frames_arrive_and_are_not_plaintext_on_the_wire():
    async def main():
        server, dialer, received, _, wire = await pair()
        secret = b'{"op": "player.update", "args": {"set": {"name": "plaintext-marker"}}}'
        dialer.send(Kind.REQUEST, 7, 1, 0, secret)  # held until the challenge is answered
        await until(lambda: received)
        assert received[0] == Frame(Kind.REQUEST, 7, 1, 0, secret)
        assert b"plaintext-marker" not in b"".join(wire)
        dialer.close()
        server.close()

    asyncio.run(main())


def test_a_wrong_link_key_or_keyring_gets_nothing_through():
    async def main():
        for kwargs in ({"dialer_auth": b"guess"}, {"dialer_ring": Keyring([os.urandom(32)])}):
            server, dialer, received, lost, _ = await pair(**kwargs)
            dialer.send(Kind.ATTACH, 1, 0, 0, b"victim")
            await asyncio.wait_for(lost.wait(), 5)  # the acceptor cut the link
            assert received == []
            server.close()

    asyncio.run(main())
