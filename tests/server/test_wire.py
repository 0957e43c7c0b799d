import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.wire import HEADER, FrameDecoder, FrameError, Kind, encode


def test_roundtrip_split_anywhere():
    data = encode(Kind.REQUEST, 7, 3, 1, b'{"id":1}') + encode(Kind.REPLY, 8, 4, 2, b"x")
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        frames = dec.feed(data[:cut]) + dec.feed(data[cut:])
        assert [(f.kind, f.session, f.seq, f.aux, f.payload) for f in frames] == [
            (Kind.REQUEST, 7, 3, 1, b'{"id":1}'),
            (Kind.REPLY, 8, 4, 2, b"x"),
        ]


def test_oversized_frame_rejected():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError):
        dec.feed(encode(Kind.REQUEST, 1, 1, 0, b"x" * 200))


def test_unknown_kind_rejected():
    bad = HEADER.pack(HEADER.size - 4, 200, 0, 0, 0)
    with pytest.raises(FrameError):
        FrameDecoder().feed(bad)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_frame_error(data):
    with contextlib.suppress(FrameError):
        FrameDecoder(max_frame=1000).feed(data)
