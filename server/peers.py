"""Node-to-node links: request/response with correlation ids and timeouts, and one-way sends.

We dial one link per peer and send our calls over it; replies come back on it. A
peer's calls to us arrive on the link *it* dialed, which the node's link server
accepts like a gateway's. When a link breaks, the calls waiting on it fail at once
with PeerLost so the caller can re-resolve the owner and retry.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import orjson

from server.link import Link, dial_link
from server.swim_codec import Keyring
from server.wire import Frame, Kind

log = logging.getLogger("ringside.peers")


class PeerLost(ConnectionError):
    """The link to the peer broke or could not be opened; the call may or may not have run."""


class Peers:
    def __init__(
        self,
        *,
        address_of: Callable[[str], tuple[str, int] | None],
        auth_key: bytes,
        max_frame: int,
        keyring: Keyring | None = None,
        write_buffer: int,
        connect_timeout: float = 1.0,
        max_calls: int = 10_000,
        unix_links: bool = False,
    ) -> None:
        self._address_of = address_of
        self._auth_key = auth_key
        self._keyring = keyring
        self._max_frame = max_frame
        self._write_buffer = write_buffer
        self._connect_timeout = connect_timeout
        self._max_calls = max_calls
        self._unix_links = unix_links
        self._links: dict[str, Link] = {}
        self._learned: dict[str, tuple[str, int]] = {}  # addresses peers told us before gossip did
        self._connecting: dict[str, asyncio.Future[Link]] = {}
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[Link, asyncio.Future[dict[str, Any]]]] = {}
        self.calls_total = 0
        self.sends_total = 0

    @property
    def links(self) -> dict[str, Link]:
        """Our open links to other nodes, by node."""
        return {node: link for node, link in self._links.items() if link.is_open}

    async def _link(self, node: str) -> Link:
        link = self._links.get(node)
        if link is not None and link.is_open:
            return link
        pending = self._connecting.get(node)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[node] = pending
            try:
                link = await self._dial(node)
                pending.set_result(link)
            except BaseException as exc:
                pending.set_exception(PeerLost(f"cannot reach {node}: {exc}"))
                pending.exception()  # retrieved: no "never retrieved" warning
                raise PeerLost(f"cannot reach {node}: {exc}") from exc
            finally:
                del self._connecting[node]
            return link
        return await asyncio.shield(pending)

    def learn(self, node: str, address: object) -> None:
        """A peer on an authenticated link told us where its own link listens (a node that
        just joined, not yet known through gossip). Gossip's address, once known, wins."""
        if (
            isinstance(address, list)
            and len(address) == 2
            and isinstance(address[0], str)
            and isinstance(address[1], int)
            and 0 < address[1] < 65536
        ):
            if len(self._learned) >= 1024:
                self._learned.clear()  # bounded: a hint is only needed for moments
            self._learned[node] = (address[0], address[1])

    async def _dial(self, node: str) -> Link:
        address = self._address_of(node) or self._learned.get(node)
        if address is None:
            raise PeerLost(f"no address for {node}")
        link = await asyncio.wait_for(
            dial_link(
                lambda: Link(
                    self._on_frames,
                    self._on_lost,
                    max_frame=self._max_frame,
                    write_buffer=self._write_buffer,
                    auth_key=self._auth_key,
                    accepting=False,
                    keyring=self._keyring,
                    name=node,
                ),
                address,
                unix=self._unix_links,
            ),
            self._connect_timeout,
        )
        self._links[node] = link
        return link

    async def connect(self, node: str, timeout: float) -> None:
        """Make sure a link to `node` is up. Raises PeerLost or TimeoutError."""
        await asyncio.wait_for(self._link(node), timeout)

    async def call(self, node: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send `message` to `node` and wait for its reply. Raises PeerLost or TimeoutError."""
        if len(self._calls) >= self._max_calls:
            raise PeerLost(f"{len(self._calls)} calls in flight")
        link = await asyncio.wait_for(self._link(node), timeout)
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (link, future)
        self.calls_total += 1
        try:
            if not link.send(Kind.ACTOR_CALL, 0, call_id, 0, orjson.dumps(message)):
                raise PeerLost(f"link to {node} closed")
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    def begin_call(self, node: str, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]] | None:
        """Send a call at once over an open link (None if there is none); await the
        returned future, bounded, for the reply. Frames sent after it leave after it."""
        link = self._links.get(node)
        if link is None or not link.is_open or len(self._calls) >= self._max_calls:
            return None
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not link.send(Kind.ACTOR_CALL, 0, call_id, 0, orjson.dumps(message)):
            return None
        self._calls[call_id] = (link, future)
        self.calls_total += 1
        future.add_done_callback(lambda _f: self._calls.pop(call_id, None))
        return future

    async def send(self, node: str, message: dict[str, Any]) -> bool:
        """One-way, best effort: False when the peer could not be reached."""
        try:
            link = await self._link(node)
        except PeerLost:
            return False
        self.sends_total += 1
        return link.send(Kind.ACTOR_SEND, 0, 0, 0, orjson.dumps(message))

    def _on_frames(self, link: Link, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.kind is not Kind.ACTOR_REPLY:
                log.warning("unexpected frame on a dialed peer link", extra={"kind": frame.kind.name})
                continue
            entry = self._calls.get(frame.seq)
            if entry is None or entry[0] is not link:
                continue  # timed out already
            try:
                reply = orjson.loads(frame.payload)
            except orjson.JSONDecodeError:
                reply = {"ok": False, "error": {"code": "internal", "message": "bad reply"}}
            if not entry[1].done():
                entry[1].set_result(reply)

    def _on_lost(self, link: Link) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for call_link, future in list(self._calls.values()):
            if call_link is link and not future.done():
                future.set_exception(PeerLost(f"link to {link.name} broke"))

    def forget(self, node: str) -> None:
        """`node` was declared faulty: close our link to it, which fails the calls waiting on
        it (a paused peer's link stays open, and they would wait out their whole timeout)."""
        link = self._links.pop(node, None)
        if link is not None:
            link.close()
            self._on_lost(link)

    def close(self) -> None:
        for link in list(self._links.values()):
            link.close()
