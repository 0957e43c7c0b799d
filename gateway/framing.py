"""Client frames cut out of the byte stream, for the gateway's hot path (decision 27).

Sans-I/O: `ClientFrames.feed(data)` returns the whole frames (RFC 6455 5.2) that `data`
completes, each as its raw bytes. A final, masked text frame with no reserved bit set, the
one frame a client sends per request, also carries its unmasked payload, so the gateway can
take it without websockets' frame parser (a generator per frame, ~15 % of the gateway's CPU).
Every other frame (control, binary, fragments, reserved bits) goes to websockets whole, so
its parser only ever sees frame boundaries and still decides what is valid.

A header websockets refuses as soon as it reads it (no mask, an unknown opcode, a length past
`max_size`) is never buffered: from it on, every byte is the library's (`spent`), so it fails
the connection (1002, 1009) as early as it would have without us.
"""

from __future__ import annotations

from typing import NamedTuple

from websockets.speedups import apply_mask

_FIN_TEXT = 0x81  # FIN, no reserved bit, opcode 1 (text)
_MASKED = 0x80
_OPCODES = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})  # continuation, text, binary, close, ping, pong


class Cut(NamedTuple):
    raw: bytes  # the frame as received (once spent: every byte from the refused header on)
    text: bytes | None  # a final, masked text frame's unmasked payload; None for any other


class ClientFrames:
    __slots__ = ("_max_size", "_partial", "spent")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._partial = bytearray()  # the start of a frame not yet whole: < max_size + 14 bytes
        self.spent = False  # a header websockets refuses was met: the library takes the stream

    def feed(self, data: bytes) -> list[Cut]:
        if self.spent:
            return [Cut(data, None)]
        buf: bytes | bytearray
        if self._partial:
            self._partial += data
            buf = self._partial
        else:
            buf = data  # the usual case, whole frames: slices of bytes are bytes
        cuts: list[Cut] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            head, second = buf[pos], buf[pos + 1]
            if not second & _MASKED or head & 0x0F not in _OPCODES:
                return self._spend(cuts, buf, pos)
            length = second & 0x7F
            header = 6  # with the mask
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 8
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 14
            if length > self._max_size:
                return self._spend(cuts, buf, pos)
            stop = pos + header + length
            if stop > end:
                break
            raw = bytes(buf[pos:stop])
            text = apply_mask(raw[header:], raw[header - 4 : header]) if head == _FIN_TEXT else None
            cuts.append(Cut(raw, text))
            pos = stop
        if buf is self._partial:
            del self._partial[:pos]
        elif pos < end:
            self._partial += buf[pos:]  # a partial frame waits for the rest
        return cuts

    def _spend(self, cuts: list[Cut], buf: bytes | bytearray, pos: int) -> list[Cut]:
        self.spent = True
        cuts.append(Cut(bytes(buf[pos:]), None))
        self._partial = bytearray()
        return cuts

    def take_partial(self) -> bytes:
        """The start of an incomplete frame, handed back when the library takes the stream."""
        partial, self._partial = bytes(self._partial), bytearray()
        return partial
