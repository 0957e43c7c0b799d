"""The game actor's state and operations. Pure: memory in, memory out.

Every event (join, leave, action, end) takes the game's next sequence number and
goes into a bounded log, so a player that missed events can fetch them. Effects
from players carry `(sender, seq)`: the game remembers the last one applied per
sender and answers a replay with the original result instead of applying it again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from server.errors import BadRequest, NotFound, RingsideError, UnknownOp


class GameFull(RingsideError):
    code = "game_full"


class NotInGame(RingsideError):
    code = "not_in_game"


class GameEnded(RingsideError):
    code = "game_ended"


@dataclass(frozen=True, slots=True)
class GameLimits:
    max_players: int = 64  # the largest max_players a game may ask for
    log_size: int = 256  # events kept for players catching up
    max_action_bytes: int = 512  # encoded size of one relayed action
    empty_close_s: float = 60.0  # an empty game ends after this long
    max_duration_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    sender: str
    action: dict[str, Any]

    def data(self, game: str) -> dict[str, Any]:
        return {"game": game, "seq": self.seq, "from": self.sender, "action": self.action}


# Fields stored as they are (log and applied need a conversion), and those a client sees.
_STORED = ("exists", "mode", "max_players", "players", "status", "seq", "scores", "ends_at", "empty_since")
_VIEWED = ("mode", "max_players", "players", "status", "seq", "scores", "ends_at")


class GameState:
    __slots__ = (
        "id",
        "exists",
        "mode",
        "max_players",
        "players",
        "status",
        "seq",
        "scores",
        "log",
        "applied",
        "ends_at",
        "empty_since",
        "announce",
    )

    def __init__(self, game_id: str, log_size: int) -> None:
        self.id = game_id
        self.exists = False
        self.mode = ""
        self.max_players = 0
        self.players: list[str] = []
        self.status = "open"
        self.seq = 0
        self.scores: dict[str, int] = {}
        self.log: deque[Event] = deque(maxlen=log_size)
        self.applied: dict[str, tuple[int, int]] = {}  # sender -> (sender seq, event seq)
        self.ends_at: float | None = None  # wall-clock deadlines survive reactivation
        self.empty_since: float | None = None
        # Not stored: when to send the last published event again, how many times it was
        # sent, and the event (server/messaging.py).
        self.announce: tuple[float, int, Event] | None = None

    # -- persistence ------------------------------------------------------
    def to_blob(self) -> bytes:
        data: dict[str, Any] = {name: getattr(self, name) for name in _STORED}
        data["log"] = [[e.seq, e.sender, e.action] for e in self.log]
        data["applied"] = self.applied
        return orjson.dumps(data)

    @classmethod
    def from_blob(cls, blob: bytes | None, game_id: str, log_size: int) -> GameState:
        state = cls(game_id, log_size)
        if blob:
            data = orjson.loads(blob)
            for name in _STORED:
                setattr(state, name, data[name])
            state.log.extend(Event(s, p, a) for s, p, a in data["log"])
            state.applied = {k: (v[0], v[1]) for k, v in data["applied"].items()}
        return state

    def view(self) -> dict[str, Any]:
        return {"game": self.id, **{name: getattr(self, name) for name in _VIEWED}}

    # -- operations -------------------------------------------------------
    def handle(
        self, op: str, args: dict[str, Any], sender: str, sender_seq: int, now: float, limits: GameLimits
    ) -> tuple[Any, list[Event]]:
        """Run one effect from `sender`; return (result, new events). Raises RingsideError."""
        if op == "game.get":
            self._require_exists()
            return self.view(), []
        if op == "game.events":
            self._require_exists()
            return self.events_after(args.get("after", 0)), []
        seen = self.applied.get(sender)
        if seen is not None and sender_seq <= seen[0]:
            # A replay of an effect we applied: same answer, no second event.
            return self._result(op, seen[1]), []
        if op == "game.create":
            events = self._create(args, sender, now, limits)
        elif op == "game.join":
            events = self._join(sender, now)
        elif op == "game.leave":
            events = self._leave(sender, now)
        elif op == "game.action":
            events = self._action(args, sender, limits)
        else:
            raise UnknownOp(f"unknown game op {op!r}")
        self.applied[sender] = (sender_seq, self.seq)
        self._bound_applied(limits)
        return self._result(op, self.seq), events

    def _result(self, op: str, event_seq: int) -> dict[str, Any]:
        if op in ("game.create", "game.join"):
            return {"game": self.id, "seq": event_seq, "players": self.players}
        return {"game": self.id, "seq": event_seq}

    def _require_exists(self) -> None:
        if not self.exists:
            raise NotFound(f"no game {self.id}")

    def _event(self, sender: str, action: dict[str, Any]) -> Event:
        self.seq += 1
        event = Event(self.seq, sender, action)
        self.log.append(event)
        return event

    def _create(self, args: dict[str, Any], sender: str, now: float, limits: GameLimits) -> list[Event]:
        if self.exists:
            raise BadRequest(f"game {self.id} exists")
        mode = args.get("mode", "default")
        max_players = args.get("max_players", 8)
        duration = args.get("duration_s")
        if not isinstance(mode, str) or len(mode) > 32:
            raise BadRequest("mode must be a string of at most 32")
        if isinstance(max_players, bool) or not isinstance(max_players, int):
            raise BadRequest("max_players must be an integer")
        if not 1 <= max_players <= limits.max_players:
            raise BadRequest(f"max_players must be 1..{limits.max_players}")
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not 0 < duration <= limits.max_duration_s
        ):
            raise BadRequest(f"duration_s must be in (0, {limits.max_duration_s}]")
        unknown = set(args) - {"mode", "max_players", "duration_s"}
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}")
        self.exists = True
        self.mode = mode
        self.max_players = max_players
        self.ends_at = now + duration if duration else None
        return [self._event(sender, {"type": "created", "mode": mode})] + self._join(sender, now)

    def _join(self, sender: str, now: float) -> list[Event]:
        self._require_exists()
        if self.status != "open":
            raise GameEnded(f"game {self.id} has ended")
        if sender in self.players:
            return []
        if len(self.players) >= self.max_players:
            raise GameFull(f"game {self.id} has {self.max_players} players")
        self.players.append(sender)
        self.scores.setdefault(sender, 0)
        self.empty_since = None
        return [self._event(sender, {"type": "joined"})]

    def _leave(self, sender: str, now: float) -> list[Event]:
        self._require_exists()
        if sender not in self.players:
            raise NotInGame(f"{sender} is not in game {self.id}")
        self.players.remove(sender)
        if not self.players:
            self.empty_since = now
        return [self._event(sender, {"type": "left"})]

    def _action(self, args: dict[str, Any], sender: str, limits: GameLimits) -> list[Event]:
        self._require_exists()
        if self.status != "open":
            raise GameEnded(f"game {self.id} has ended")
        if sender not in self.players:
            raise NotInGame(f"{sender} is not in game {self.id}")
        action = args.get("action")
        if not isinstance(action, dict) or not isinstance(action.get("type"), str):
            raise BadRequest('action must be an object with a string "type"')
        if action["type"] in ("created", "joined", "left", "ended"):
            raise BadRequest(f"action type {action['type']!r} is reserved")
        if len(orjson.dumps(action)) > limits.max_action_bytes:
            raise BadRequest(f"action is larger than {limits.max_action_bytes} bytes")
        if action["type"] == "score":
            points = action.get("points")
            if isinstance(points, bool) or not isinstance(points, int) or abs(points) > 1_000_000:
                raise BadRequest("score points must be an integer within ±1000000")
            self.scores[sender] = self.scores.get(sender, 0) + points
        return [self._event(sender, action)]

    def _bound_applied(self, limits: GameLimits) -> None:
        # Keep dedup entries for players in the game and the most recent others.
        keep = 4 * limits.max_players
        if len(self.applied) > keep:
            for sender in list(self.applied):
                if sender not in self.players:
                    del self.applied[sender]
                    if len(self.applied) <= keep:
                        break

    def events_after(self, after: Any) -> dict[str, Any]:
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise BadRequest("after must be a non-negative integer")
        first = self.log[0].seq if self.log else self.seq + 1
        events = [e.data(self.id) for e in self.log if e.seq > after]
        return {"game": self.id, "events": events, "seq": self.seq, "truncated": after + 1 < first}

    # -- timers -----------------------------------------------------------
    def next_deadline(self, limits: GameLimits) -> float | None:
        if not self.exists or self.status != "open":
            return None
        deadlines = [self.ends_at] if self.ends_at is not None else []
        if self.empty_since is not None:
            deadlines.append(self.empty_since + limits.empty_close_s)
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float, limits: GameLimits) -> list[Event]:
        deadline = self.next_deadline(limits)
        if deadline is None or now < deadline:
            return []
        reason = "time" if self.ends_at is not None and now >= self.ends_at else "empty"
        self.status = "ended"
        return [self._event("", {"type": "ended", "reason": reason, "scores": dict(self.scores)})]
