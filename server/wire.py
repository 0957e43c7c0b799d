"""Node-link framing: a small binary header in front of opaque payload bytes.

Sans-I/O: `encode()` makes bytes, `FrameDecoder.feed()` turns received bytes into
frames. The gateway never parses a client's JSON after `hello`; it forwards the
frame's bytes in a REQUEST and the node's REPLY bytes go back to the client as is.

Layout (network byte order): u32 length of what follows, u8 kind, u64 session,
u64 seq, u64 aux, then the payload.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct("!IBQQQ")
_BODY_HEADER = HEADER.size - 4


class Kind(enum.IntEnum):
    ATTACH = 1  # gw->node: payload = player id; seq = the gateway's next seq - 1
    ATTACHED = 2  # node->gw: seq = the actor's applied seq
    REQUEST = 3  # gw->node: payload = the client's frame
    REPLY = 4  # node->gw: payload = the frame for the client; aux = durable seq
    DURABLE = 5  # node->gw: seq = the session's requests up to here are durable
    DETACH = 6  # gw->node
    ERROR = 7  # node->gw: attach failed; payload = {"code","message"} JSON
    SESSION_LOST = 8  # node->gw: this node no longer hosts the session's actor; re-attach
    PUSH = 9  # node->gw: payload = an event frame; seq = event seq; aux = hash of its stream
    ACTOR_CALL = 10  # node->node: seq = correlation id; payload = JSON effect for an actor
    ACTOR_REPLY = 11  # node->node: seq = correlation id; payload = JSON {"ok", "result"|"error"}
    ACTOR_SEND = 12  # node->node: one-way JSON effect
    FILL = 13  # gw->node: the client got a stream (aux) up to seq only; push what follows again
    LINK_CHALLENGE = 14  # acceptor->dialer, first frame: payload = 16 random bytes
    LINK_PROOF = 15  # dialer->acceptor: payload = HMAC-SHA256(link key, challenge)
    MOVED = 16  # node->gw: the actor migrated to the node named in the payload; attach there


class Frame(NamedTuple):  # a tuple: half the cost of a frozen dataclass per frame
    kind: Kind
    session: int
    seq: int = 0
    aux: int = 0
    payload: bytes = b""


_KINDS = {kind.value: kind for kind in Kind}  # a dict lookup, not Kind(value)


class FrameError(ValueError):
    """The peer sent bytes that are not a frame; the link must be closed."""


def encode(kind: Kind, session: int, seq: int = 0, aux: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(_BODY_HEADER + len(payload), kind, session, seq, aux) + payload


class FrameDecoder:
    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, *, max_frame: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        """Append received bytes; return every complete frame. Raises FrameError."""
        buf: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            buf = data  # the usual case, whole frames: slices of bytes are bytes, one copy
        frames: list[Frame] = []
        offset = 0
        size = len(buf)
        while size - offset >= HEADER.size:
            length, kind, session, seq, aux = HEADER.unpack_from(buf, offset)
            if length < _BODY_HEADER or length > self._max_frame:
                raise FrameError(f"frame length {length} out of bounds")
            end = offset + 4 + length
            if end > size:
                break
            frame_kind = _KINDS.get(kind)
            if frame_kind is None:
                raise FrameError(f"unknown frame kind {kind}")
            frames.append(Frame(frame_kind, session, seq, aux, bytes(buf[offset + HEADER.size : end])))
            offset = end
        if buf is self._buffer:
            del self._buffer[:offset]
        elif offset < size:
            self._buffer += buf[offset:]  # a partial frame waits for the rest
        return frames
