"""Client frames cut from the stream (gateway/framing.py), against websockets as the oracle.

Sans-I/O first: frames serialized by websockets itself (or, for the invalid ones, by hand),
split at arbitrary points, must come back as the same frames, text ones unmasked. Then over
real sockets: the same byte streams, in the same chunks, sent to a GatewayConnection and to
websockets' own ServerConnection must deliver the same messages and end with the same close
code.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from gateway.app import GatewayConnection
from gateway.framing import ClientFrames

MAX = 4096


def masked(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=True)


def unmasked_text(payload: bytes) -> bytes:
    return bytes((0x81, len(payload))) + payload  # a client must mask: a protocol error


def reserved_bit_text(payload: bytes) -> bytes:
    frame = bytearray(masked(Opcode.TEXT, payload))
    frame[0] |= 0x40  # RSV1 without an extension: a protocol error
    return bytes(frame)


def wide_text(payload: bytes) -> bytes:
    """A text frame with its length in the 64-bit form (valid, if not the shortest)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | 127)) + len(payload).to_bytes(8, "big") + mask + body


def bad_opcode(payload: bytes) -> bytes:
    frame = bytearray(masked(Opcode.BINARY, payload))
    frame[0] = (frame[0] & 0xF0) | 0x3  # a reserved opcode
    return bytes(frame)


def oversized_header(wide: bool = False) -> bytes:
    if wide:  # a 64-bit length
        return bytes((0x81, 0x80 | 127)) + (MAX + 1).to_bytes(8, "big") + os.urandom(4)
    return bytes((0x81, 0x80 | 126)) + (MAX + 1).to_bytes(2, "big") + os.urandom(4)


payloads = st.one_of(
    st.binary(max_size=130),
    st.sampled_from([125, 126, 127, 65, MAX]).map(lambda n: b"x" * n),
)
# (bytes on the wire, the payload if it is a final masked text frame, or None)
valid_frames = st.one_of(
    payloads.map(lambda p: (masked(Opcode.TEXT, p), p)),
    payloads.map(lambda p: (masked(Opcode.BINARY, p), None)),
    st.binary(max_size=125).map(lambda p: (masked(Opcode.PING, p), None)),
    st.binary(max_size=125).map(lambda p: (masked(Opcode.PONG, p), None)),
    payloads.map(lambda p: (masked(Opcode.TEXT, p, fin=False), None)),
    payloads.map(lambda p: (masked(Opcode.CONT, p), None)),
    st.binary(max_size=125).map(lambda p: (reserved_bit_text(p), None)),
    st.binary(max_size=300).map(lambda p: (wide_text(p), p)),
)
# Headers websockets refuses as soon as it reads them.
refused_headers = st.one_of(
    st.booleans().map(oversized_header),
    st.binary(max_size=125).map(unmasked_text),
    st.binary(max_size=125).map(bad_opcode),
)


def split(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_frames, max_size=12), st.randoms(use_true_random=False))
def test_frames_come_back_whole_at_any_split(frames, rng):
    stream = b"".join(raw for raw, _ in frames)
    cutter = ClientFrames(MAX)
    cuts = [cut for chunk in (split(stream, rng) if stream else []) for cut in cutter.feed(chunk)]
    assert [c.raw for c in cuts] == [raw for raw, _ in frames]
    assert [c.text for c in cuts] == [text for _, text in frames]
    assert cutter.take_partial() == b"" and not cutter.spent


@settings(max_examples=100, deadline=None)
@given(
    st.lists(valid_frames, max_size=4),
    refused_headers,
    st.binary(max_size=64),
    st.randoms(use_true_random=False),
)
def test_a_refused_header_hands_every_later_byte_to_the_library(frames, refused, after, rng):
    """Never buffered up to its length: websockets fails the connection as soon as it would."""
    before = b"".join(raw for raw, _ in frames)
    stream = before + refused[:14] + after
    cutter = ClientFrames(MAX)
    cuts = [cut for chunk in split(stream, rng) for cut in cutter.feed(chunk)]
    assert cutter.spent
    assert b"".join(c.raw for c in cuts) == stream, "nothing lost, nothing doubled"
    assert [c.raw for c in cuts[: len(frames)]] == [raw for raw, _ in frames]


def test_an_incomplete_frame_waits_and_is_handed_back():
    cutter = ClientFrames(MAX)
    frame = masked(Opcode.TEXT, b"hello")
    assert cutter.feed(frame[:3]) == []
    assert cutter.take_partial() == frame[:3]


# -- the same streams, over sockets, against websockets' own connection -------------------


class Stream(NamedTuple):
    chunks: list[bytes]  # written one by one, each most often read on its own
    eof: bool = False  # then half-close: the server reads the end of the stream


async def run_server(
    connection_class: type[ServerConnection], streams: list[Stream], take: bool = False
) -> list[tuple[list[bytes], int | None, int | None]]:
    """Per stream: the messages the server got, the close code it received and the one it
    sent. With `take`, a GatewayConnection's text frames go to `on_message` (the gateway's
    fast path) rather than to `recv()`."""
    results: dict[int, tuple[list[bytes], int | None, int | None]] = {}

    async def handler(ws: ServerConnection) -> None:
        index = int(ws.request.path.strip("/"))
        messages: list[bytes] = []
        if take and isinstance(ws, GatewayConnection):
            ws.on_message = lambda payload: messages.append(payload) is None
        try:
            while True:
                message = await ws.recv(decode=False)
                messages.append(message if isinstance(message, bytes) else message.encode())
        except ConnectionClosed:
            pass
        sent = ws.protocol.close_sent
        results[index] = (messages, ws.close_code, sent.code if sent is not None else None)

    async with serve(
        handler, "127.0.0.1", 0, create_connection=connection_class, max_size=MAX, compression=None
    ) as server:
        port = server.sockets[0].getsockname()[1]
        for index, stream in enumerate(streams):
            chunks = stream.chunks
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /{index} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            if index % 4 == 0:  # frames sent with the request, before the handshake's answer
                writer.write(chunks[0])
                chunks = chunks[1:]
            await reader.readuntil(b"\r\n\r\n")
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.001)  # most chunks arrive as reads of their own
            if stream.eof:
                writer.write_eof()
            async with asyncio.timeout(10):
                while await reader.read(65536):  # until the server closes the connection
                    pass
            writer.close()
            async with asyncio.timeout(10):
                while index not in results:
                    await asyncio.sleep(0.005)
    return [results[i] for i in range(len(streams))]


class CountingFrames(ClientFrames):
    """ClientFrames that counts the text frames it cut (class-wide, for one test)."""

    texts = 0

    def feed(self, data: bytes):
        cuts = super().feed(data)
        CountingFrames.texts += sum(cut.text is not None for cut in cuts)
        return cuts


def test_a_gateway_connection_delivers_what_websockets_delivers(monkeypatch):
    monkeypatch.setattr("gateway.app.ClientFrames", CountingFrames)
    CountingFrames.texts = 0
    rng = random.Random(27)
    close = masked(Opcode.CLOSE, (1000).to_bytes(2, "big"))
    texts = [masked(Opcode.TEXT, b'{"op":"player.update","n":%d}' % i) for i in range(20)]
    fragmented = masked(Opcode.TEXT, b"frag", fin=False) + masked(Opcode.CONT, b"ment")
    endings = [
        close,
        unmasked_text(b"bad"),
        reserved_bit_text(b"bad"),
        oversized_header() + b"y" * 100,
        oversized_header(wide=True) + b"y" * 100,
        masked(Opcode.CONT, b"unexpected"),
        masked(Opcode.TEXT, b"x" * 200, fin=False) + masked(Opcode.TEXT, b"y"),  # text mid-fragments
        masked(Opcode.TEXT, b"\xff\xfe not utf-8") + close,
    ]
    # Sent with the handshake request (stream 0): a frame and the header and mask of the
    # next, so websockets' parser waits mid-frame with an empty buffer; it keeps the stream.
    streams = [Stream([texts[1] + texts[2][:6], texts[2][6:] + texts[3] + close])]
    for ending in endings * 3:
        middle = [masked(Opcode.PING, b"p"), masked(Opcode.BINARY, b"\x00\x01"), fragmented]
        frames = texts[: rng.randint(1, 20)] + rng.sample(middle, rng.randint(0, 3)) + texts[:3]
        streams.append(Stream(split(b"".join(frames) + ending + texts[0], rng)))
    # Refused headers with the rest of their frame still to come: failed at once, the client
    # still connected; partial frames at the end of the stream.
    streams += [
        Stream([texts[0], unmasked_text(b"x" * 100)[:10]]),
        Stream([texts[0], bad_opcode(b"x" * 100)[:10]]),
        Stream([texts[0], unmasked_text(b"x" * 100)[:10]], eof=True),
        Stream([texts[0], bad_opcode(b"x" * 100)[:10]], eof=True),
        Stream([texts[0], texts[1][:9]], eof=True),
        Stream([masked(Opcode.TEXT, b"x" * 4000, fin=False), masked(Opcode.CONT, b"y" * 999)[:500]], True),
        Stream([masked(Opcode.TEXT, b"x" * 4000, fin=False), masked(Opcode.CONT, b"y" * 999)[:500]]),
    ]

    async def main():
        ours = await run_server(GatewayConnection, streams)
        theirs = await run_server(ServerConnection, streams)
        for i, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
            assert mine == reference, (i, mine, reference)
        assert {sent for _, _, sent in theirs} >= {1000, 1002, 1009}, "the streams end in each way"
        delivered = sum(len(messages) for messages, _, _ in ours)
        assert CountingFrames.texts > delivered // 2, (CountingFrames.texts, delivered)

    asyncio.run(main())


def test_text_frames_reach_on_message_as_websockets_would_deliver_them(monkeypatch):
    """The gateway's fast path proper: text frames go to `on_message`, cut here."""
    monkeypatch.setattr("gateway.app.ClientFrames", CountingFrames)
    CountingFrames.texts = 0
    rng = random.Random(22)
    close = masked(Opcode.CLOSE, (1000).to_bytes(2, "big"))
    ping = masked(Opcode.PING, b"p")
    texts = [masked(Opcode.TEXT, b"request %d" % i) for i in range(30)]
    streams = [Stream(split(b"".join(texts[:n] + [ping] + texts[n:]) + close, rng)) for n in range(1, 9)]

    async def main():
        ours = await run_server(GatewayConnection, streams, take=True)
        theirs = await run_server(ServerConnection, streams)
        assert ours == theirs
        # All but those sent with the handshake request (run_server: every 4th stream).
        assert CountingFrames.texts >= 30 * sum(1 for i in range(len(streams)) if i % 4)

    asyncio.run(main())
