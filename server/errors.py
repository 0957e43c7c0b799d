"""The client-facing error tree, mapped to protocol error codes in one place.

    RingsideError (internal)
    ├── BadRequest (bad_request)
    │   └── BadJson (bad_json)
    ├── UnknownOp (unknown_op)
    ├── NotFound (not_found)
    ├── Unavailable (unavailable)     Redis away and the dirty set full, or no owner
    │   └── ActorMoved (unavailable)  the actor left this node while the message waited
    └── Overloaded (overloaded)       activation cap reached, mailbox full

WebSocket close codes used by the gateway are listed in CloseCode; both are
documented in docs/protocol.md.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson


class RingsideError(Exception):
    code = "internal"

    def __init__(self, message: str = "", *, request_id: Any = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.request_id = request_id  # the failing request's id, when known


class BadRequest(RingsideError):
    code = "bad_request"


class BadJson(BadRequest):
    code = "bad_json"


class UnknownOp(RingsideError):
    code = "unknown_op"


class NotFound(RingsideError):
    code = "not_found"


class Unavailable(RingsideError):
    code = "unavailable"


class ActorMoved(Unavailable):
    """The actor was deactivated here (fenced off, or migrated to `node`) while a message
    for it waited. Never shown to a client: its session re-attaches and replays instead."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__(f"the actor moved to {node}; try again" if node else "the actor moved; try again")
        self.node = node


class Overloaded(RingsideError):
    code = "overloaded"


class CloseCode(enum.IntEnum):
    GOING_AWAY = 1001  # the gateway is shutting down
    UNSUPPORTED_DATA = 1003  # a binary frame
    POLICY = 1008  # generic policy violation
    TOO_BIG = 1009  # a frame over max_frame_bytes (sent by websockets itself)
    INTERNAL_ERROR = 1011  # a bug in the gateway; reconnect and the session continues
    TRY_AGAIN_LATER = 1013  # the gateway is full or the player's node cannot take the session
    BAD_HELLO = 4000  # the first frame was not a valid hello
    UNAUTHORIZED = 4001  # missing, forged or expired token
    HANDSHAKE_TIMEOUT = 4002  # no hello within handshake_timeout_s
    SESSION_REPLACED = 4003  # a newer hello for the same player took over
    TOO_SLOW = 4004  # the client did not read its frames; outbound queue full
    OWNER_LOST = 4005  # the player's node stayed unreachable past move_timeout_s
    RATE_LIMITED = 4006  # more frames than rate_limit_per_s / rate_limit_burst allow


def error_reply(request_id: Any, exc: RingsideError) -> bytes:
    return orjson.dumps({"id": request_id, "ok": False, "error": {"code": exc.code, "message": exc.message}})


def ok_reply(request_id: Any, result: Any) -> bytes:
    return orjson.dumps({"id": request_id, "ok": True, "result": result})
