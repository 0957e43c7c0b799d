"""Node links on loopback: authentication, sealing, what a wrong key gets, and the Unix socket
between processes on one host."""

from __future__ import annotations

import asyncio
import os

import pytest

from server.link import UNIX_LINKS_SUPPORTED, Link, dial_link, serve_unix_links
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


@pytest.mark.skipif(not UNIX_LINKS_SUPPORTED, reason="abstract Unix sockets are Linux-only")
def test_a_link_to_a_node_on_this_host_goes_over_its_unix_socket_and_falls_back_to_tcp():
    async def main():
        loop = asyncio.get_running_loop()
        received: list[tuple[str, Frame]] = []

        def make(accepting: bool) -> Link:
            return Link(
                lambda link, frames: received.extend((link.via, f) for f in frames),
                lambda _l: None,
                max_frame=1 << 16,
                write_buffer=1 << 16,
                auth_key=AUTH,
                accepting=accepting,
            )

        tcp = await loop.create_server(lambda: make(True), "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        unix = await serve_unix_links(lambda: make(True), "127.0.0.1", port)
        assert unix is not None
        # The same node's TCP-only twin: nothing serves its Unix name.
        bare = await loop.create_server(lambda: make(True), "127.0.0.1", 0)
        bare_port = bare.sockets[0].getsockname()[1]

        links = [
            await dial_link(lambda: make(False), ("127.0.0.1", port), unix=True),
            await dial_link(lambda: make(False), ("127.0.0.1", port), unix=False),
            await dial_link(lambda: make(False), ("127.0.0.1", bare_port), unix=True),
        ]
        assert [link.via for link in links] == ["unix", "tcp", "tcp"]
        for i, link in enumerate(links):
            link.send(Kind.REQUEST, i, 1, 0, b"hello")
        await until(lambda: len(received) == 3)
        # Each arrived on the acceptor's end of the same kind of socket, authenticated.
        assert sorted((f.session, via) for via, f in received) == [(0, "unix"), (1, "tcp"), (2, "tcp")]
        for link in links:
            link.close()
        for server in (tcp, unix, bare):
            server.close()

    asyncio.run(main())
