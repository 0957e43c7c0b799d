"""The gateway's per-client reader under backpressure, driven through a stub connection.

A reader whose session has no replay space waits; it must stop when its session is taken
over or closed, or its handler never ends and the client's per-address slot leaks. The
stub stands in for a websockets connection: frames to read, sends recorded, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import types

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State

from gateway.app import Gateway, GatewayConnection, text_frame_header
from gateway.session import Session
from loadtest.harness import free_ports
from server.config import ClusterConfig, GatewaySettings
from server.errors import CloseCode
from server.wire import Frame, Kind


class StubConnection:
    def __init__(self, frames: list[bytes]) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        for frame in frames:
            self.incoming.put_nowait(frame)
        self.sent: list[bytes] = []
        self.protocol = types.SimpleNamespace(state=State.OPEN, send_text=self.sent.append)
        self.paused = False

    async def recv(self, decode: bool = False) -> bytes:
        return await self.incoming.get()

    async def send(self, payload: bytes, text: bool = True) -> None:
        self.sent.append(payload)

    def send_data(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.protocol.state = State.CLOSING

    async def wait_closed(self) -> None:
        pass


async def until(condition, what: str, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


def serving(gateway: Gateway, session_id: int, frames: list[bytes], max_replay: int = 2):
    core = Session(session_id, f"p{session_id}", "n1", max_replay=max_replay)
    core.attached("n1", 0)
    ws = StubConnection(frames)
    cs = gateway._client_session(core, ws)  # type: ignore[arg-type]
    cs.attached.set_result(None)
    cs.welcomed = True
    return cs, ws, asyncio.get_running_loop().create_task(gateway._serve(cs))


def test_a_reader_waiting_for_replay_space_stops_when_its_session_is_taken_over():
    async def main():
        gateway = Gateway(ClusterConfig())
        cs, _, reader = serving(gateway, 1, [b"r1", b"r2", b"r3"])
        await until(lambda: cs.space is not None, "the reader waits for space after r1, r2")
        gateway._take_over(cs, StubConnection([]))  # type: ignore[arg-type]
        await until(reader.done, "the old reader ended")

    asyncio.run(main())


def test_a_reader_that_reads_after_a_take_over_does_not_wait_forever():
    async def main():
        gateway = Gateway(ClusterConfig())
        cs, ws, reader = serving(gateway, 2, [b"r1", b"r2"])
        await until(lambda: cs.core.buffered == 2, "r1, r2 submitted; the reader is in recv()")
        gateway._take_over(cs, StubConnection([]))  # type: ignore[arg-type]
        ws.incoming.put_nowait(b"r3")  # a frame the old socket had buffered
        await until(lambda: reader.done() or cs.space is not None, "r3 read")
        link = types.SimpleNamespace(name="n1")
        # The replies (and the space they free) go to the new socket's session.
        gateway._on_frames(link, [Frame(Kind.REPLY, 2, 1, 1, b"a1"), Frame(Kind.REPLY, 2, 2, 2, b"a2")])  # type: ignore[arg-type]
        await until(reader.done, "the old reader ended")

    asyncio.run(main())


def test_a_reader_waiting_for_replay_space_stops_when_the_client_is_closed():
    async def main():
        gateway = Gateway(ClusterConfig())
        cs, _, reader = serving(gateway, 3, [b"r1", b"r2"], max_replay=1)
        await until(lambda: cs.space is not None, "the reader waits for space after r1")
        cs.close(CloseCode.OWNER_LOST, "the player's node stayed unreachable")
        await until(reader.done, "the reader ended")
        assert cs.core.buffered == 1, "nothing read after the close was submitted"

    asyncio.run(main())


def test_a_frame_from_the_protocol_callback_waits_behind_one_the_reader_holds():
    async def main():
        gateway = Gateway(ClusterConfig())
        forwarded: list[bytes] = []
        gateway.links["n1"] = types.SimpleNamespace(  # type: ignore[assignment]
            name="n1", send=lambda kind, session, seq, aux, payload: forwarded.append(payload)
        )
        cs, _, reader = serving(gateway, 4, [b"r1", b"r2", b"r3"], max_replay=2)
        await until(lambda: cs.space is not None, "the reader holds r3, waiting for space")
        # r1 is answered and durable: room for one more, and the reader is woken...
        gateway._on_frames(gateway.links["n1"], [Frame(Kind.REPLY, 4, 1, 1, b"a1")])  # type: ignore[arg-type]
        # ...but r4 arrives from the protocol callback before the reader has run again.
        assert gateway._on_client_frame(cs, b"r4") is False, "r4 goes to the reader's queue"
        await until(lambda: len(forwarded) == 3, "the reader forwarded r3")
        assert forwarded == [b"r1", b"r2", b"r3"]
        reader.cancel()

    asyncio.run(main())


def test_a_frame_never_overtakes_frames_queued_for_the_reader():
    """A real connection (so websockets sets up its receive queue); the frames are handed
    to it as its protocol callback would, so their timing is ours."""

    async def main():
        accepted: asyncio.Queue[GatewayConnection] = asyncio.Queue()

        async def handler(ws: GatewayConnection) -> None:
            accepted.put_nowait(ws)
            await ws.wait_closed()

        async with serve(handler, "127.0.0.1", 0, create_connection=GatewayConnection) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}"):
                conn = await asyncio.wait_for(accepted.get(), 5)
                taken: list[bytes] = []
                room = [False]

                def on_message(payload: bytes) -> bool:
                    if room[0]:
                        taken.append(payload)
                    return room[0]

                conn.on_message = on_message
                conn.process_event(WsFrame(Opcode.TEXT, b"f1"))  # no room: queued for the reader
                room[0] = True
                conn.process_event(WsFrame(Opcode.TEXT, b"f2"))  # room now, but f1 waits: queued too
                assert taken == []
                assert await conn.recv(decode=False) == b"f1"
                assert await conn.recv(decode=False) == b"f2"
                conn.process_event(WsFrame(Opcode.TEXT, b"f3"))  # nothing queued: straight through
                conn.process_event(WsFrame(Opcode.TEXT, b"f4", fin=False))  # a fragment: the reader's
                assert taken == [b"f3"]

    asyncio.run(main())


def test_text_frame_headers_match_what_websockets_would_send():
    for length in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = b"x" * length
        frame = WsFrame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        assert text_frame_header(length) + payload == frame, length


def test_a_closing_session_leaves_its_frames_to_the_reader_so_the_socket_is_paused():
    async def main():
        gateway = Gateway(ClusterConfig())
        cs, ws, reader = serving(gateway, 5, [], max_replay=8)
        await until(lambda: cs.core.buffered == 0 and not reader.done(), "the reader is in recv()")
        assert gateway._on_client_frame(cs, b"r1") is True
        cs.close(CloseCode.RATE_LIMITED, "too many frames; slow down")
        # Dropping it here would keep websockets' queue empty, so a flooding client whose
        # close is under way would be read (and parsed) at line rate until the close ends.
        assert gateway._on_client_frame(cs, b"r2") is False
        ws.incoming.put_nowait(b"r2")  # where websockets puts it: the reader sees the close
        await until(reader.done, "the reader ended")
        assert cs.core.buffered == 1, "r2 was not forwarded"

    asyncio.run(main())


def test_over_the_rate_limit_every_forwarded_request_is_answered_before_the_close():
    """4006 comes after the replies to every request forwarded before the limit, and no frame
    past the limit reaches a node: a request has a reply if and only if it was applied."""

    async def main():
        gateway = Gateway(ClusterConfig(gateway=GatewaySettings(rate_limit_per_s=0.001, rate_limit_burst=2)))
        forwarded: list[bytes] = []
        gateway.links["n1"] = types.SimpleNamespace(  # type: ignore[assignment]
            name="n1", send=lambda kind, session, seq, aux, payload: forwarded.append(payload)
        )
        cs, ws, reader = serving(gateway, 8, [], max_replay=8)
        await until(lambda: not reader.done(), "the reader is in recv()")
        for frame in (b"r1", b"r2", b"r3"):  # r3 is over the limit
            gateway._on_client_frame(cs, frame)
        assert gateway._on_client_frame(cs, b"r4") is False, "past the limit, frames are not taken"
        ws.incoming.put_nowait(b"r4")
        await until(reader.done, "the reader stops reading")
        assert forwarded == [b"r1", b"r2"]
        link = gateway.links["n1"]
        gateway._on_frames(link, [Frame(Kind.REPLY, 8, 1, 0, b"a1")])  # type: ignore[arg-type]
        assert cs.close_code is None, "r2 is still to be answered"
        gateway._on_frames(link, [Frame(Kind.REPLY, 8, 2, 0, b"a2")])  # type: ignore[arg-type]
        assert cs.close_code is CloseCode.RATE_LIMITED
        assert ws.sent == [b"a1", b"a2"]

    asyncio.run(main())


def test_over_the_rate_limit_a_reply_that_never_comes_does_not_hold_the_close():
    async def main():
        settings = GatewaySettings(rate_limit_per_s=0.001, rate_limit_burst=1, move_timeout_s=0.05)
        gateway = Gateway(ClusterConfig(gateway=settings))
        gateway.links["n1"] = types.SimpleNamespace(name="n1", send=lambda *a: None)  # type: ignore[assignment]
        cs, _, reader = serving(gateway, 9, [b"r1", b"r2"], max_replay=8)
        await until(reader.done, "r2 is over the limit")
        assert cs.close_code is None
        await until(lambda: cs.close_code is CloseCode.RATE_LIMITED, "closed after move_timeout_s")

    asyncio.run(main())


def test_a_failing_frame_handler_closes_the_socket_with_1011_not_an_abort():
    async def main():
        accepted: asyncio.Queue[GatewayConnection] = asyncio.Queue()

        async def handler(ws: GatewayConnection) -> None:
            accepted.put_nowait(ws)
            await ws.wait_closed()

        def broken(payload: bytes) -> bool:
            raise RuntimeError("a bug")

        async with serve(handler, "127.0.0.1", 0, create_connection=GatewayConnection) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as client:
                conn = await asyncio.wait_for(accepted.get(), 5)
                conn.on_message = broken
                await client.send("boom")
                await asyncio.wait_for(client.wait_closed(), 5)
                assert client.close_code == CloseCode.INTERNAL_ERROR

    asyncio.run(main())


class SlowClient(StubConnection):
    """A socket whose client reads nothing until `resume()`: sends wait, as on a full one."""

    def __init__(self) -> None:
        super().__init__([])
        self.paused = True
        self._reading = asyncio.Event()

    def resume(self) -> None:
        self.paused = False
        self._reading.set()

    def pause(self) -> None:
        self.paused = True
        self._reading.clear()

    async def send(self, payload: bytes, text: bool = True) -> None:
        await self._reading.wait()
        self.sent.append(payload)


def test_a_take_over_keeps_every_reply_in_flight_until_its_backlog_has_drained():
    """More requests in flight than max_outbound when the client reconnects: their replies
    come to the new socket before its welcome, then wait for a client slow to read. None is
    closed 4004 for that, before the welcome or after it; once they have drained, the bound
    is max_outbound again."""

    async def main():
        # A client that had that many requests in flight sent them in a burst.
        gateway = Gateway(ClusterConfig(gateway=GatewaySettings(rate_limit_burst=1000.0)))
        settings = gateway.settings
        n = settings.max_outbound + 50
        requests = [b"r%d" % i for i in range(n)]
        cs, _, old_reader = serving(gateway, 7, requests, max_replay=settings.max_replay)
        await until(lambda: cs.core.buffered == n, "every request in flight")
        client = SlowClient()
        new = gateway._take_over(cs, client)  # type: ignore[arg-type]
        link = types.SimpleNamespace(name="n1")
        gateway._on_frames(link, [Frame(Kind.REPLY, 7, i + 1, 0, b"a%d" % i) for i in range(n)])  # type: ignore[arg-type]
        assert new.close_code is None and len(new.outbound or ()) == n, "all wait for the welcome"
        new.welcome_sent()
        new.push(b"next")  # the reply to the first request on the new socket
        assert new.close_code is None, "the backlog still has its allowance"
        client.resume()
        await until(lambda: new.outbound is None, "the backlog drained")
        assert client.sent == [b"a%d" % i for i in range(n)] + [b"next"]
        client.pause()
        for i in range(settings.max_outbound + 1):
            new.push(b"b%d" % i)
        assert new.close_code is CloseCode.TOO_SLOW, "past the backlog, max_outbound holds"
        old_reader.cancel()

    asyncio.run(main())


def test_a_link_that_keeps_failing_keeps_retrying_and_says_so(caplog):
    """Past 1,024 refused connections the backoff's 2**attempt was past a float: the
    OverflowError ended the link's task, and the gateway never linked to that node again."""

    async def main():
        # Nothing listens there. Outside the ephemeral range: 1,200 connects to a port inside
        # it could each, rarely, get that port as their source and connect to themselves.
        (port,) = free_ports(1)
        settings = GatewaySettings(link_retry_base_ms=0, link_retry_cap_ms=0)
        gateway = Gateway(ClusterConfig(gateway=settings))
        gateway.membership = types.SimpleNamespace(link_address=lambda name: ("127.0.0.1", port))  # type: ignore[assignment]
        task = asyncio.get_running_loop().create_task(gateway._maintain_link("n1"))

        def attempts() -> int:
            return max((getattr(r, "attempt", 0) for r in caplog.records), default=0)

        await until(lambda: attempts() >= 1200 or task.done(), "1,200 attempts", timeout=30)
        assert not task.done(), task.exception()
        task.cancel()
        assert "link to a node failed" in caplog.text

    with caplog.at_level(logging.WARNING, logger="ringside.gateway"):
        asyncio.run(main())
