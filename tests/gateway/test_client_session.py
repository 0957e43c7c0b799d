"""The gateway's per-client reader under backpressure, driven through a stub connection.

A reader whose session has no replay space waits; it must stop when its session is taken
over or closed, or its handler never ends and the client's per-address slot leaks. The
stub stands in for a websockets connection: frames to read, sends recorded, nothing else.
"""

from __future__ import annotations

import asyncio
import types

from websockets.protocol import State

from gateway.app import Gateway
from gateway.session import Session
from server.config import ClusterConfig
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
