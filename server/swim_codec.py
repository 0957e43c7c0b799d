"""SWIM gossip messages and their wire codec.

Wire format: ``VERSION (1 byte) || orjson payload || HMAC-SHA256(key, VERSION || payload)``.
The MAC covers everything before it, so a packet from outside the cluster, a flipped bit
or a truncated datagram all fail in :func:`decode` with :class:`GossipDecodeError`, and
the caller must drop the packet without acting on any part of it.

The parser is strict (exact types, bounded sizes) because a valid MAC only proves the
sender holds the key, not that it runs a compatible, bug-free version.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "Ack",
    "GossipDecodeError",
    "GossipKey",
    "Keyring",
    "Member",
    "MemberState",
    "Message",
    "Nack",
    "Ping",
    "PingReq",
    "PushPull",
    "Rumor",
    "decode",
    "encode",
]

VERSION = 1
SEALED = 2  # AES-GCM packets
MAC_SIZE = 32
MAX_NAME = 255
MAX_ITEMS = 8192  # rumors per packet or members per push-pull; far above any sane cluster
Addr = tuple[str, int]


class GossipDecodeError(ValueError):
    """The bytes are not an authentic, well-formed gossip message: drop them."""


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    FAULTY = "faulty"
    LEAVING = "leaving"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    addr: Addr
    incarnation: int
    state: MemberState
    # Excluded from the hash so members stay hashable although meta is a dict.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Rumor:
    """A claim about one member; ``origin`` is who made it (the suspector, for SUSPECT)."""

    member: Member
    origin: str


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    sender: str
    target: str  # the name the sender expects at this address; others must not ack
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    sender: str  # the member that answered (for a relayed ack: the probed target)
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: a relay tells the requester it is alive but the target did not answer."""

    seq: int
    sender: str


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    sender: str
    target: str
    target_addr: Addr
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class PushPull:
    sender: str
    sender_addr: Addr
    members: tuple[Member, ...]
    reply: bool = False  # False: a request the receiver answers; True: the answer
    join: bool = False


Message = Ping | Ack | Nack | PingReq | PushPull


# -- encoding ---------------------------------------------------------------------------


def _member_obj(m: Member) -> list[Any]:
    return [m.name, [m.addr[0], m.addr[1]], m.incarnation, m.state.value, dict(m.meta)]


def _rumors_obj(rumors: tuple[Rumor, ...]) -> list[Any]:
    return [[_member_obj(r.member), r.origin] for r in rumors]


def _to_obj(msg: Message) -> dict[str, Any]:
    match msg:
        case Ping():
            return {
                "t": "ping",
                "q": msg.seq,
                "s": msg.sender,
                "g": msg.target,
                "r": _rumors_obj(msg.rumors),
            }
        case Ack():
            return {"t": "ack", "q": msg.seq, "s": msg.sender, "r": _rumors_obj(msg.rumors)}
        case Nack():
            return {"t": "nack", "q": msg.seq, "s": msg.sender}
        case PingReq():
            return {
                "t": "pingreq",
                "q": msg.seq,
                "s": msg.sender,
                "g": msg.target,
                "a": [msg.target_addr[0], msg.target_addr[1]],
                "r": _rumors_obj(msg.rumors),
            }
        case PushPull():
            return {
                "t": "pushpull",
                "s": msg.sender,
                "a": [msg.sender_addr[0], msg.sender_addr[1]],
                "m": [_member_obj(m) for m in msg.members],
                "y": msg.reply,
                "j": msg.join,
            }
    raise TypeError(f"not a gossip message: {type(msg).__name__}")


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")  # one C call; hmac.new builds a Python object


class Keyring:
    """AES-GCM keys for gossip: the first key seals, every key opens, so keys rotate
    without downtime (add a key everywhere, then make it first everywhere, then drop the
    old one). Wire format: ``SEALED (1 byte) || nonce (12) || ciphertext+tag``."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) not in (16, 24, 32) for k in keys):
            raise ValueError("gossip keys are 16, 24 or 32 bytes, at least one")
        self._ciphers = [AESGCM(k) for k in keys]

    def seal(self, payload: bytes, aad: bytes = b"") -> bytes:
        """`aad`: bytes sent in the clear that the tag must also cover (a frame header)."""
        nonce = os.urandom(12)
        return bytes([SEALED]) + nonce + self._ciphers[0].encrypt(nonce, payload, bytes([SEALED]) + aad)

    def open(self, data: bytes, aad: bytes = b"") -> bytes:
        if len(data) < 1 + 12 + 16 or data[0] != SEALED:
            raise GossipDecodeError("not a sealed packet")
        nonce, sealed = data[1:13], data[13:]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, sealed, bytes([SEALED]) + aad)
            except InvalidTag:
                continue
        raise GossipDecodeError("no key opens this packet")


GossipKey = bytes | Keyring  # bytes: HMAC-only mode (development); Keyring: AES-GCM


def encode(msg: Message, key: GossipKey) -> bytes:
    payload = orjson.dumps(_to_obj(msg))
    if isinstance(key, Keyring):
        return key.seal(payload)
    body = bytes([VERSION]) + payload
    return body + _mac(key, body)


# -- decoding ---------------------------------------------------------------------------


def _int(v: Any) -> int:
    if type(v) is not int:
        raise GossipDecodeError("expected an integer")
    return v


def _nonneg(v: Any) -> int:
    i = _int(v)
    if i < 0:
        raise GossipDecodeError("expected a non-negative integer")
    return i


def _str(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_NAME:
        raise GossipDecodeError("expected a short non-empty string")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise GossipDecodeError("expected a boolean")
    return v


def _list(v: Any, limit: int = MAX_ITEMS) -> list[Any]:
    if type(v) is not list or len(v) > limit:
        raise GossipDecodeError("expected a bounded list")
    return v


def _addr(v: Any) -> Addr:
    items = _list(v, 2)
    if len(items) != 2:
        raise GossipDecodeError("expected [host, port]")
    port = _int(items[1])
    if not 0 <= port <= 65535:
        raise GossipDecodeError("port out of range")
    return (_str(items[0]), port)


def _member(v: Any) -> Member:
    items = _list(v, 5)
    if len(items) != 5 or type(items[4]) is not dict:
        raise GossipDecodeError("expected [name, addr, incarnation, state, meta]")
    try:
        state = MemberState(items[3])
    except ValueError:
        raise GossipDecodeError("unknown member state") from None
    return Member(_str(items[0]), _addr(items[1]), _nonneg(items[2]), state, items[4])


def _rumors(v: Any) -> tuple[Rumor, ...]:
    out = []
    for item in _list(v):
        pair = _list(item, 2)
        if len(pair) != 2:
            raise GossipDecodeError("expected [member, origin]")
        out.append(Rumor(_member(pair[0]), _str(pair[1])))
    return tuple(out)


def _from_obj(obj: Any) -> Message:
    if type(obj) is not dict:
        raise GossipDecodeError("expected an object")
    kind = obj.get("t")
    if kind == "ping":
        return Ping(_int(obj["q"]), _str(obj["s"]), _str(obj["g"]), _rumors(obj["r"]))
    if kind == "ack":
        return Ack(_int(obj["q"]), _str(obj["s"]), _rumors(obj["r"]))
    if kind == "nack":
        return Nack(_int(obj["q"]), _str(obj["s"]))
    if kind == "pingreq":
        return PingReq(_int(obj["q"]), _str(obj["s"]), _str(obj["g"]), _addr(obj["a"]), _rumors(obj["r"]))
    if kind == "pushpull":
        members = tuple(_member(m) for m in _list(obj["m"]))
        return PushPull(_str(obj["s"]), _addr(obj["a"]), members, _bool(obj["y"]), _bool(obj["j"]))
    raise GossipDecodeError("unknown message type")


def decode(data: bytes, key: GossipKey) -> Message:
    """Verify and parse one packet; raises :class:`GossipDecodeError` and nothing else."""
    if isinstance(key, Keyring):
        payload = key.open(data)
    else:
        if len(data) < 1 + MAC_SIZE + 2:
            raise GossipDecodeError("packet too short")
        body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        if not hmac.compare_digest(mac, _mac(key, body)):
            raise GossipDecodeError("bad MAC")
        if body[0] != VERSION:
            raise GossipDecodeError(f"unsupported version {body[0]}")
        payload = body[1:]
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise GossipDecodeError("malformed JSON") from exc
    try:
        return _from_obj(obj)
    except KeyError as exc:
        raise GossipDecodeError(f"missing field {exc}") from None
