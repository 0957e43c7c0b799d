"""The asyncio adapter for a node link: a TCP stream of `server.wire` frames.

Used on both ends (the node serves links, the gateway dials them). When our
peer stops reading and our write buffer passes its high-water mark we stop
reading from the peer too, so a slow peer slows only its own link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from server.wire import Frame, FrameDecoder, FrameError, Kind, encode

log = logging.getLogger("ringside.link")


class Link(asyncio.Protocol):
    def __init__(
        self,
        on_frames: Callable[[Link, list[Frame]], None],
        on_lost: Callable[[Link], None],
        *,
        max_frame: int,
        write_buffer: int,
        name: str = "",
    ) -> None:
        self._on_frames = on_frames
        self._on_lost = on_lost
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._write_buffer = write_buffer
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self._write_buffer)
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            log.warning("bad frame on link; closing", extra={"peer": self.name, "error": str(exc)})
            self.close()
            return
        if frames:
            self._on_frames(self, frames)

    def send(self, kind: Kind, session: int, seq: int = 0, aux: int = 0, payload: bytes = b"") -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        data = encode(kind, session, seq, aux, payload)
        self.bytes_out += len(data)
        self.transport.write(data)
        return True

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
