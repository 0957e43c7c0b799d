"""Client frames cut out of the byte stream, for the gateway's hot path (decision 27).

Sans-I/O: `ClientFrames.feed(data)` returns the whole frames (RFC 6455 5.2) that `data`
completes, each as its raw bytes. A final, masked text frame with no reserved bit set, the
one frame a client sends per request, also carries its unmasked payload, so the gateway can
take it without websockets' frame parser (a generator per frame, ~15 % of the gateway's CPU).
Every other frame (control, binary, fragments, reserved bits, unmasked) goes to websockets
whole, so its parser only ever sees frame boundaries and still decides what is valid.

A frame longer than `max_size` is never buffered: from its header on, every byte is the
library's (`spent`), which closes the connection with 1009 as before.
"""

from __future__ import annotations

from typing import NamedTuple

from websockets.speedups import apply_mask

_FIN_TEXT = 0x81  # FIN, no reserved bit, opcode 1 (text)
_MASKED = 0x80


class Cut(NamedTuple):
    raw: bytes  # the frame as received (for a frame past max_size: every byte from its header on)
    text: bytes | None  # a final, masked text frame's unmasked payload; None for any other


class ClientFrames:
    __slots__ = ("_max_size", "_partial", "spent")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._partial = b""  # the start of a frame not yet whole: at most max_size + 14 bytes
        self.spent = False  # a frame past max_size was met: the library takes the stream

    def feed(self, data: bytes) -> list[Cut]:
        if self.spent:
            return [Cut(data, None)]
        buf = self._partial + data if self._partial else data
        cuts: list[Cut] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            head, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                length = self._max_size + 1  # a 64-bit length: past any bound we set
            if length > self._max_size:
                self.spent = True
                self._partial = b""
                cuts.append(Cut(bytes(buf[pos:]), None))
                return cuts
            if second & _MASKED:
                header += 4
            stop = pos + header + length
            if stop > end:
                break
            raw = buf[pos:stop]
            text = None
            if head == _FIN_TEXT and second & _MASKED:
                text = apply_mask(raw[header:], raw[header - 4 : header])
            cuts.append(Cut(raw, text))
            pos = stop
        self._partial = bytes(buf[pos:]) if pos < end else b""
        return cuts

    def take_partial(self) -> bytes:
        """The start of an incomplete frame, handed back when the library takes the stream."""
        partial, self._partial = self._partial, b""
        return partial
