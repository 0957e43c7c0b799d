"""The bench generator's client against a real websockets server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidMessage, InvalidStatus

from loadtest.wsclient import CLOSE_TIMEOUT_S, ClientConnection

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, **kw: Any) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, compression=None, **kw) as srv:
        port = srv.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def received() -> tuple[list[bytes], Callable[[bytes], None], asyncio.Event]:
    messages: list[bytes] = []
    arrived = asyncio.Event()

    def on_message(data: bytes) -> None:
        messages.append(data)
        arrived.set()

    return messages, on_message, arrived


async def wait_for_count(messages: list[bytes], arrived: asyncio.Event, n: int) -> None:
    async with asyncio.timeout(5):
        while len(messages) < n:
            arrived.clear()
            await arrived.wait()


def test_text_messages_round_trip_and_a_clean_close() -> None:
    async def main() -> None:
        async with server(echo) as url:
            messages, on_message, arrived = received()
            ws = await ClientConnection.connect(url, on_message)
            assert ws.open
            for i in range(50):
                ws.send_text(b'{"id": %d}' % i)
            await wait_for_count(messages, arrived, 50)
            assert messages == [b'{"id": %d}' % i for i in range(50)]
            await ws.close()
            assert ws.closed.done() and not ws.open
            assert ws.close_code == 1000

    asyncio.run(main())


def test_a_refused_handshake_fails_the_connect() -> None:
    async def main() -> None:
        def refuse(connection: ServerConnection, request: Any) -> Any:
            return connection.respond(403, "no\n")

        async with server(echo, process_request=refuse) as url:
            with pytest.raises(InvalidStatus):
                await ClientConnection.connect(url, lambda data: None)

    asyncio.run(main())


def test_a_reply_that_is_not_http_fails_the_connect_at_once() -> None:
    async def main() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await asyncio.sleep(30)  # and keeps the connection open

        srv = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(InvalidMessage):
                await ClientConnection.connect(f"ws://127.0.0.1:{port}/ws", lambda data: None)
            assert asyncio.get_running_loop().time() - started < CLOSE_TIMEOUT_S
        finally:
            srv.close()

    asyncio.run(main())


def test_the_server_closing_ends_the_connection_with_its_code() -> None:
    async def main() -> None:
        async def close_after_one(ws: ServerConnection) -> None:
            await ws.recv()
            await ws.close(4003, "replaced")

        async with server(close_after_one) as url:
            ws = await ClientConnection.connect(url, lambda data: None)
            ws.send_text(b"x")
            await asyncio.wait_for(asyncio.shield(ws.closed), 5)
            assert ws.close_code == 4003
            with pytest.raises(Exception):  # noqa: B017, PT011 - websockets' InvalidState
                ws.send_text(b"after the close")

    asyncio.run(main())


def test_pings_are_answered_and_fragments_are_counted_not_delivered() -> None:
    async def main() -> None:
        async def ping_then_fragment(ws: ServerConnection) -> None:
            await asyncio.wait_for(await ws.ping(), 5)  # answered by the client's protocol
            await ws.send(["frag", "ments"])  # one message in two frames
            await ws.send("whole")
            await ws.wait_closed()

        async with server(ping_then_fragment) as url:
            messages, on_message, arrived = received()
            ws = await ClientConnection.connect(url, on_message)
            await wait_for_count(messages, arrived, 1)
            assert messages == [b"whole"]
            assert ws.fragments >= 2  # a first frame and its continuations
            await ws.close()

    asyncio.run(main())
