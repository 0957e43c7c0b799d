"""The load generator's WebSocket client: websockets' sans-I/O `ClientProtocol` on an asyncio
protocol, with no task, lock or queue per connection.

Under websockets' asyncio client every received message passes a queue, a future and the
reader task of its connection before the generator sees it, and every send takes a lock.
Here a received text frame goes straight to a callback (and is timed there), and a send is
one `transport.write`. websockets still does the handshake, the masking, the parsing and the
closing handshake (its `ClientProtocol`, the same as under its asyncio client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

CLOSE_TIMEOUT_S = 5.0


class ClientConnection(asyncio.Protocol):
    """One client connection. `on_message(data)` gets each text or binary message's bytes.
    Messages come whole from the servers measured (neither fragments a reply), so a
    fragmented one is not reassembled: its parts are counted in `fragments` and dropped."""

    def __init__(self, url: str, on_message: Callable[[bytes], None], max_size: int = 2**20) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=max_size)
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.fragments = 0
        self._abort_later: asyncio.TimerHandle | None = None

    @classmethod
    async def connect(
        cls, url: str, on_message: Callable[[bytes], None], timeout: float = 15.0, max_size: int = 2**20
    ) -> ClientConnection:
        uri = parse_uri(url)
        loop = asyncio.get_running_loop()
        connection = cls(url, on_message, max_size)
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: connection, uri.host, uri.port)
            try:
                await asyncio.shield(connection.opened)
            except BaseException:
                connection.abort()
                raise
        return connection

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason

    def send_text(self, data: bytes) -> None:
        """Queue one text message (the bench's frames are JSON, already UTF-8)."""
        self.protocol.send_text(data)
        self._write()

    async def close(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(CloseCode.NORMAL_CLOSURE)
            self._write()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.protocol.send_request(self.protocol.connect())
        self._write()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                if protocol.handshake_exc is None:
                    self._settle(self.opened)
            elif not isinstance(event, Frame):
                continue
            elif event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY:
                if event.fin:
                    self.on_message(bytes(event.data))
                else:
                    self.fragments += 1
            elif event.opcode is Opcode.CONT:
                self.fragments += 1
        if protocol.handshake_exc is not None:  # refused, or a reply that is not HTTP at all
            self._settle(self.opened, protocol.handshake_exc)
        self._write()
        if protocol.close_expected() and self._abort_later is None:
            # The server closes TCP once the closing handshake is done; do not wait forever.
            self._abort_later = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.abort)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._write()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_later is not None:
            self._abort_later.cancel()
        self.protocol.receive_eof()
        error = self.protocol.handshake_exc or exc
        error = error or ConnectionError(f"connection closed (code {self.protocol.close_code})")
        self._settle(self.opened, error)
        self._settle(self.closed)

    # -- internals -----------------------------------------------------------------------

    def _write(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    @staticmethod
    def _settle(future: asyncio.Future[None], error: BaseException | None = None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
            future.exception()  # retrieved: nobody may be waiting any more
