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


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=40)), max_size=6),
    st.lists(st.integers(1, 30), max_size=20),
)
def test_a_stream_cut_into_any_pieces_decodes_to_the_same_frames(sent, cuts):
    data = b"".join(encode(Kind.PUSH, session, 1, 2, payload) for session, payload in sent)
    dec = FrameDecoder()
    frames, at = [], 0
    for size in [*cuts, len(data)]:
        frames += dec.feed(data[at : at + size])
        at += size
    assert [(f.session, f.payload) for f in frames] == sent
    assert all(type(f.payload) is bytes for f in frames)


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
