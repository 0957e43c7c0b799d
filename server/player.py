"""The player actor's state and operations. Pure: memory in, memory out.

The runtime calls `PlayerState.handle(op, args)` in the actor's turn; a
mutating operation returns `mutated=True` so the runtime marks the actor dirty.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from server.config import NodeSettings
from server.errors import BadJson, BadRequest, UnknownOp

SETTABLE = ("name", "level", "position", "inventory", "stats")
INCREMENTABLE = ("xp", "level")
MAX_INT = 2**53  # JSON-safe integers only
STAT_KEY_MAX = 32
_REQUEST_FIELDS = frozenset(("id", "op", "args"))
_UPDATE_FIELDS = frozenset(("set", "incr"))


def _check_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_INT:
        raise BadRequest(f"{field} must be an integer from -2**53 to 2**53")
    return value


def _check_number(field: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > MAX_INT:
        raise BadRequest(f"{field} must be a number from -2**53 to 2**53")
    return value


class PlayerState:
    __slots__ = ("name", "xp", "level", "position", "inventory", "stats", "applied_seq", "games")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.xp = 0
        self.level = 1
        self.position: list[float | int] = [0, 0, 0]
        self.inventory: list[str] = []
        self.stats: dict[str, float | int] = {}
        self.applied_seq = 0
        self.games: dict[str, int] = {}  # game id -> seq of the last event pushed to the player

    # -- persistence ------------------------------------------------------
    def _state(self, games: Any) -> dict[str, Any]:
        # One literal, no merge: it is built for every reply and every write.
        return {
            "name": self.name,
            "xp": self.xp,
            "level": self.level,
            "position": self.position,
            "inventory": self.inventory,
            "stats": self.stats,
            "applied_seq": self.applied_seq,
            "games": games,
        }

    def to_blob(self) -> bytes:
        return orjson.dumps(self._state(self.games))

    @classmethod
    def from_blob(cls, blob: bytes | None, default_name: str) -> PlayerState:
        state = cls(default_name)
        if blob:
            data = orjson.loads(blob)
            state.name = data.get("name", default_name)
            state.xp = data.get("xp", 0)
            state.level = data.get("level", 1)
            state.position = data.get("position", [0, 0, 0])
            state.inventory = data.get("inventory", [])
            state.stats = data.get("stats", {})
            state.applied_seq = data.get("applied_seq", 0)
            state.games = data.get("games", {})
        return state

    def view(self) -> dict[str, Any]:
        """What a client sees: the games as a list of ids."""
        return self._state(sorted(self.games) if self.games else [])

    # -- operations -------------------------------------------------------
    def handle(self, op: str, args: dict[str, Any], limits: NodeSettings, *, seq: int) -> tuple[Any, bool]:
        """Run request `seq`; return (result, mutated). Raises a RingsideError, changing nothing."""
        if op == "player.get":
            if args:
                raise BadRequest("player.get takes no args")
            return self.view(), False
        if op == "player.update":
            self._update(args, limits)
            self.applied_seq = seq
            return self.view(), True
        raise UnknownOp(f"unknown op {op!r}")

    def _update(self, args: dict[str, Any], limits: NodeSettings) -> None:
        if not _UPDATE_FIELDS.issuperset(args):
            unknown = sorted(set(args) - _UPDATE_FIELDS)
            raise BadRequest(f"player.update takes only 'set' and 'incr', not {unknown}")
        sets = args.get("set", {})
        incrs = args.get("incr", {})
        if not isinstance(sets, dict) or not isinstance(incrs, dict):
            raise BadRequest("'set' and 'incr' must be objects")
        if not sets and not incrs:
            raise BadRequest("player.update needs 'set' or 'incr'")
        # Validate everything first so a bad field changes nothing.
        staged = {field: self._validated_set(field, value, limits) for field, value in sets.items()}
        for field, value in incrs.items():
            if field not in INCREMENTABLE:
                raise BadRequest(f"cannot incr {field!r}; incrementable: {list(INCREMENTABLE)}")
            base = staged[field] if field in staged else getattr(self, field)  # set, then incr
            new = base + _check_int(f"incr.{field}", value)
            if abs(new) > MAX_INT:
                raise BadRequest(f"{field} would overflow")
            staged[field] = new
        for field, value in staged.items():
            setattr(self, field, value)

    @staticmethod
    def _validated_set(field: str, value: Any, limits: NodeSettings) -> Any:
        if field == "name":
            if not isinstance(value, str) or len(value) > limits.max_name_len:
                raise BadRequest(f"name must be a string of at most {limits.max_name_len}")
            if not value.isprintable():  # control, bidi-override and NUL characters: other players see it
                raise BadRequest("name must be printable: no control or format characters")
            return value
        if field == "level":
            return _check_int("level", value)
        if field == "position":
            if not isinstance(value, list) or len(value) != 3:
                raise BadRequest("position must be [x, y, z]")
            for v in value:  # set 10 times a second by every player: no call per coordinate
                kind = type(v)
                if (kind is not float and kind is not int) or not -MAX_INT <= v <= MAX_INT:
                    raise BadRequest("position must be three numbers from -2**53 to 2**53")
            return value
        if field == "inventory":
            if not isinstance(value, list) or len(value) > limits.max_inventory:
                raise BadRequest(f"inventory must be a list of at most {limits.max_inventory}")
            if not all(isinstance(item, str) and len(item) <= 64 for item in value):
                raise BadRequest("inventory items must be strings of at most 64")
            return value
        if field == "stats":
            if not isinstance(value, dict) or len(value) > limits.max_stats:
                raise BadRequest(f"stats must be an object of at most {limits.max_stats} keys")
            for key, v in value.items():
                if len(key) > STAT_KEY_MAX:
                    raise BadRequest(f"stat names are at most {STAT_KEY_MAX} characters")
                _check_number(f"stats.{key}", v)
            return value
        raise BadRequest(f"cannot set {field!r}; settable: {list(SETTABLE)}")


class Request(NamedTuple):  # made per request: a tuple is cheaper than a frozen dataclass
    id: Any
    op: str
    args: dict[str, Any]


def parse_request(payload: bytes) -> Request:
    """Parse a client request frame; raises BadJson or BadRequest carrying the id if known."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadJson("frame is not valid JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest("a request is a JSON object")
    request_id = data.get("id")
    if (
        request_id is None
        or isinstance(request_id, bool)
        or not isinstance(request_id, (int, str))
        or (isinstance(request_id, str) and len(request_id) > 64)
    ):
        # Its reply could not be told from that of a frame with no readable id (id null).
        raise BadRequest("id is required: an integer or a string of at most 64")
    op = data.get("op")
    args = data.get("args", {})
    if not isinstance(op, str):
        raise BadRequest("op must be a string", request_id=request_id)
    if op == "hello":
        raise BadRequest(
            "this session is welcomed already: hello is its first frame only", request_id=request_id
        )
    if not isinstance(args, dict):
        raise BadRequest("args must be an object", request_id=request_id)
    if not _REQUEST_FIELDS.issuperset(data):
        raise BadRequest(f"unknown fields {sorted(set(data) - _REQUEST_FIELDS)}", request_id=request_id)
    return Request(request_id, op, args)
