"""The asyncio adapter for a node link: a stream of `server.wire` frames, over TCP or, between
processes on one host, a Unix socket.

Used on both ends (the node serves links, the gateway and peers dial them). When our
peer stops reading and our write buffer passes its high-water mark we stop
reading from the peer too, so a slow peer slows only its own link.

Links are authenticated: the accepting side sends a random challenge, the dialer
answers with an HMAC of it under the cluster's link key, and until that proof
arrives the acceptor acts on nothing (a wrong proof or any other frame closes the
link). The dialer holds its outgoing frames (bounded) until it has answered.

With a keyring (the cluster's gossip keys), every frame after the handshake carries its
payload sealed with AES-GCM, the header bound to it as associated data; a frame that does
not open closes the link.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import cast

from server.swim_codec import GossipDecodeError, Keyring
from server.wire import HEADER, Frame, FrameDecoder, FrameError, Kind, encode

log = logging.getLogger("ringside.link")


class Link(asyncio.Protocol):
    def __init__(
        self,
        on_frames: Callable[[Link, list[Frame]], None],
        on_lost: Callable[[Link], None],
        *,
        max_frame: int,
        write_buffer: int,
        auth_key: bytes,
        accepting: bool,
        keyring: Keyring | None = None,
        name: str = "",
    ) -> None:
        self._on_frames = on_frames
        self._on_lost = on_lost
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._write_buffer = write_buffer
        self.name = name
        self._auth_key = auth_key
        self._keyring = keyring
        self._accepting = accepting
        self._challenge = b""
        self.authenticated = False
        self._held: list[bytes] = []  # a dialer's frames before it has answered the challenge
        self._out: list[bytes] = []  # frames to write at the end of this loop iteration
        self._receiving = False  # in data_received: it writes `_out` when the handlers return
        self._held_bytes = 0
        self.transport: asyncio.Transport | None = None
        self.via = ""  # "tcp" or "unix" once connected
        self.closed = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.bytes_out = 0
        self.auth_failures = 0

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self._write_buffer)
        sock = transport.get_extra_info("socket")
        self.via = "unix" if sock is not None and sock.family == socket.AF_UNIX else "tcp"
        if self._accepting:
            self._challenge = os.urandom(16)
            self.transport.write(encode(Kind.LINK_CHALLENGE, 0, payload=self._challenge))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            log.warning("bad frame on link; closing", extra={"peer": self.name, "error": str(exc)})
            self.close()
            return
        if not self.authenticated and frames:
            frames = self._authenticate(frames)
        if frames and self._keyring is not None:
            try:
                frames = [self._open(f) for f in frames]
            except GossipDecodeError:
                log.warning("link frame failed to open; closing", extra={"peer": self.name})
                self.auth_failures += 1
                self.abort()
                return
        if frames:
            # What the handlers send back on this link leaves in one write when they are
            # done, rather than in a callback of the next loop iteration.
            self._receiving = True
            try:
                self._on_frames(self, frames)
            finally:
                self._receiving = False
                if self._out:
                    self._flush_out()

    def _open(self, frame: Frame) -> Frame:
        assert self._keyring is not None
        aad = HEADER.pack(0, frame.kind, frame.session, frame.seq, frame.aux)
        payload = self._keyring.open(frame.payload, aad)
        return Frame(frame.kind, frame.session, frame.seq, frame.aux, payload)

    def _proof(self, challenge: bytes) -> bytes:
        return hmac.new(self._auth_key, b"ringside-link\0" + challenge, hashlib.sha256).digest()

    def _authenticate(self, frames: list[Frame]) -> list[Frame]:
        first, rest = frames[0], frames[1:]
        if self._accepting:
            if first.kind is not Kind.LINK_PROOF or not hmac.compare_digest(
                first.payload, self._proof(self._challenge)
            ):
                log.warning("link failed authentication; closing", extra={"peer": self.name})
                self.auth_failures += 1
                self.abort()
                return []
            self.authenticated = True
            return rest
        if first.kind is not Kind.LINK_CHALLENGE or len(first.payload) != 16:
            log.warning("link peer sent no challenge; closing", extra={"peer": self.name})
            self.abort()
            return []
        assert self.transport is not None
        self.transport.write(encode(Kind.LINK_PROOF, 0, payload=self._proof(first.payload)))
        self.authenticated = True
        held, self._held = self._held, []
        self._held_bytes = 0
        self.transport.writelines(held)
        return rest

    def send(self, kind: Kind, session: int, seq: int = 0, aux: int = 0, payload: bytes = b"") -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        if self._keyring is not None:
            payload = self._keyring.seal(payload, HEADER.pack(0, kind, session, seq, aux))
        data = encode(kind, session, seq, aux, payload)
        self.bytes_out += len(data)
        if not self.authenticated:
            if self._accepting or self._held_bytes + len(data) > self._write_buffer:
                return False
            self._held.append(data)
            self._held_bytes += len(data)
            return True
        # Frames made in one loop iteration leave in one write (one syscall, not one each).
        out = self._out
        out.append(data)
        if len(out) == 1 and not self._receiving:
            asyncio.get_running_loop().call_soon(self._flush_out)
        return True

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self)


UNIX_LINKS_SUPPORTED = sys.platform == "linux"  # abstract-namespace Unix sockets


def unix_link_name(host: str, port: int) -> str:
    """The abstract Unix socket on which a node serves the same links as on TCP host:port.
    Named by that address, so it is unique on a host (as the port is) and only a process on
    the node's own host (and network namespace) can reach it."""
    return f"\0ringside-link-{host}:{port}"


async def serve_unix_links(
    factory: Callable[[], Link], host: str, port: int
) -> asyncio.AbstractServer | None:
    """Serve links on `unix_link_name(host, port)` too; None (TCP only) where that fails."""
    if not UNIX_LINKS_SUPPORTED:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(unix_link_name(host, port))
    except OSError as exc:
        sock.close()
        log.warning("links over a Unix socket unavailable; TCP only", extra={"error": str(exc)})
        return None
    return await asyncio.get_running_loop().create_unix_server(factory, sock=sock)


async def dial_link(factory: Callable[[], Link], address: tuple[str, int], *, unix: bool) -> Link:
    """Connect a link to a node: over its Unix socket when `unix` and the node is on this
    host, else (or when that is refused) over TCP. Raises OSError as create_connection does."""
    loop = asyncio.get_running_loop()
    if unix and UNIX_LINKS_SUPPORTED:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, unix_link_name(*address))
        except OSError:
            sock.close()  # not on this host (or an older node): TCP
        else:
            _, link = await loop.create_unix_connection(factory, sock=sock)
            return link
    _, link = await loop.create_connection(factory, *address)
    return link
