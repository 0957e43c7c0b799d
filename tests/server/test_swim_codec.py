from __future__ import annotations

import contextlib
import hashlib
import hmac

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.swim_codec import (
    Ack,
    GossipDecodeError,
    Member,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Rumor,
    decode,
    encode,
)

KEY = b"cluster-secret"

names = st.text(min_size=1, max_size=20)
addrs = st.tuples(st.sampled_from(["127.0.0.1", "10.0.0.7", "node-a"]), st.integers(0, 65535))
metas = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=8), st.lists(st.integers(0, 9), max_size=3)),
    max_size=3,
)
members = st.builds(Member, names, addrs, st.integers(0, 2**40), st.sampled_from(MemberState), metas)
rumors = st.lists(st.builds(Rumor, members, names), max_size=8).map(tuple)
seqs = st.integers(-(2**31), 2**31)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, seqs, names, names, rumors),
    st.builds(Ack, seqs, names, rumors),
    st.builds(Nack, seqs, names),
    st.builds(PingReq, seqs, names, names, addrs, rumors),
    st.builds(
        PushPull,
        names,
        addrs,
        st.lists(members, max_size=10).map(tuple),
        st.booleans(),
        st.booleans(),
    ),
)


def _sign(body: bytes) -> bytes:
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


@given(messages)
def test_roundtrip(msg: Message) -> None:
    assert decode(encode(msg, KEY), KEY) == msg


@settings(max_examples=200)
@given(messages, st.data())
def test_any_flipped_bit_is_rejected(msg: Message, data: st.DataObject) -> None:
    packet = bytearray(encode(msg, KEY))
    bit = data.draw(st.integers(0, len(packet) * 8 - 1))
    packet[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(GossipDecodeError):
        decode(bytes(packet), KEY)


@given(messages, st.data())
def test_truncated_packet_is_rejected(msg: Message, data: st.DataObject) -> None:
    packet = encode(msg, KEY)
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(GossipDecodeError):
        decode(packet[:cut], KEY)


@given(messages)
def test_wrong_key_is_rejected(msg: Message) -> None:
    with pytest.raises(GossipDecodeError):
        decode(encode(msg, KEY), b"another-cluster")


@given(st.binary(max_size=300))
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(GossipDecodeError):
        decode(data, KEY)


# Authentic (correct MAC) but malformed: a buggy or incompatible peer. The parser must
# still raise only GossipDecodeError, whatever JSON it is handed.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=5),
    max_leaves=20,
)


@given(
    st.sampled_from(["ping", "ack", "nack", "pingreq", "pushpull", "zap"]),
    st.dictionaries(st.sampled_from(["q", "s", "g", "r", "a", "m", "y", "j"]), json_values),
)
def test_signed_but_malformed_is_rejected(kind: str, fields: dict[str, object]) -> None:
    body = b"\x01" + orjson.dumps({"t": kind, **fields})
    with contextlib.suppress(GossipDecodeError):  # anything else fails the test
        decode(_sign(body), KEY)


@given(st.binary(max_size=200))
def test_signed_non_json_is_rejected(payload: bytes) -> None:
    with contextlib.suppress(GossipDecodeError):
        decode(_sign(b"\x01" + payload), KEY)


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "ping", "q": 1, "s": "a", "g": "b"},  # missing rumors
        {"t": "ping", "q": True, "s": "a", "g": "b", "r": []},  # bool is not an int
        {"t": "ping", "q": 1, "s": "", "g": "b", "r": []},  # empty name
        {"t": "nack", "q": 1.5, "s": "a"},
        {"t": "pingreq", "q": 1, "s": "a", "g": "b", "a": ["h", 70000], "r": []},
        {"t": "ack", "q": 1, "s": "a", "r": [[["b", ["h", 1], 0, "zombie", {}], "a"]]},
        {"t": "ack", "q": 1, "s": "a", "r": [[["b", ["h", 1], -1, "alive", {}], "a"]]},
        {"t": "pushpull", "s": "a", "a": ["h", 1], "m": [], "y": 1, "j": False},
        [1, 2, 3],
    ],
)
def test_specific_malformed_messages(obj: object) -> None:
    with pytest.raises(GossipDecodeError):
        decode(_sign(b"\x01" + orjson.dumps(obj)), KEY)


def test_unknown_version_is_rejected() -> None:
    packet = encode(Nack(1, "a"), KEY)
    with pytest.raises(GossipDecodeError):
        decode(_sign(b"\x02" + packet[1:-32]), KEY)
