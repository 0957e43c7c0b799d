"""A client session at the gateway, sans-I/O: sequence numbers, the replay buffer, pinning.

Every request gets the session's next sequence number and stays in the replay
buffer until the owner node reports it durable *and* its reply has reached the
client. When the session moves to another activation (node lost, actor
re-activated), `replay()` yields what the new owner must see again; the owner
skips what it already applied, and `on_reply` forwards each reply once.
"""

from __future__ import annotations

import enum
from collections import deque


class SessionState(enum.Enum):
    ATTACHING = "attaching"  # waiting for the owner's ATTACHED
    PINNED = "pinned"  # requests go straight to the owner
    MOVING = "moving"  # owner lost; requests wait in the buffer
    CLOSED = "closed"


TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ATTACHING: frozenset({SessionState.PINNED, SessionState.MOVING, SessionState.CLOSED}),
    SessionState.PINNED: frozenset({SessionState.MOVING, SessionState.CLOSED}),
    SessionState.MOVING: frozenset({SessionState.ATTACHING, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class PushVerdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"  # an event is missing before this one: do not deliver, ask for a fill


class ReplayFull(Exception):
    """The replay buffer holds max_replay requests; the caller must wait."""


class Session:
    __slots__ = (
        "id",
        "player",
        "node",
        "state",
        "next_seq",
        "answered",
        "durable",
        "_buffer",
        "max_replay",
        "moving_since",
        "fresh",
        "_streams",
    )

    def __init__(self, session_id: int, player: str, node: str, *, max_replay: int) -> None:
        self.id = session_id
        self.player = player
        self.node = node  # the owner this session is pinned to (or moving to)
        self.state = SessionState.ATTACHING
        self.next_seq = 1
        self.answered = 0  # highest seq whose reply went to the client
        self.durable = 0  # highest seq the owner reported durable
        self._buffer: deque[tuple[int, bytes]] = deque()
        self.max_replay = max_replay
        self.moving_since: float | None = None
        self.fresh = True  # never attached yet: take the actor's seq as our base
        self._streams: dict[int, int] = {}  # push stream (a game) -> last seq delivered

    def transition(self, new: SessionState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"session {self.id}: {self.state.value} -> {new.value} not allowed")
        self.state = new

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def unanswered(self) -> int:
        """Requests submitted whose reply has not gone to the client."""
        return self.next_seq - 1 - self.answered

    @property
    def has_space(self) -> bool:
        return len(self._buffer) < self.max_replay

    def submit(self, payload: bytes) -> int:
        """Stamp a client frame with the next seq and keep it for replay. Returns the seq."""
        if len(self._buffer) >= self.max_replay:
            raise ReplayFull(f"{len(self._buffer)} requests not yet durable")
        seq = self.next_seq
        self.next_seq = seq + 1
        self._buffer.append((seq, payload))
        return seq

    def attached(self, node: str, applied_seq: int) -> list[tuple[int, bytes]]:
        """The owner `node` holds our actor. Returns the requests to (re)send, in order."""
        self.transition(SessionState.PINNED)
        self.node = node
        self.moving_since = None
        if self.fresh:
            # The first attach happens before the client may send anything: continue
            # the actor's numbering so its applied_seq keeps deduplicating replays.
            self.fresh = False
            self.next_seq = applied_seq + 1
            self.answered = self.durable = applied_seq
        return list(self._buffer)

    def moving(self, now: float) -> None:
        """The owner is gone or lost our actor; hold requests until re-attached."""
        if self.state is not SessionState.MOVING:
            self.transition(SessionState.MOVING)
            self.moving_since = now

    def reattaching(self, node: str) -> None:
        self.transition(SessionState.ATTACHING)
        self.node = node

    def on_reply(self, seq: int, durable: int) -> bool:
        """A reply for `seq` arrived; True if it is the first and goes to the client."""
        first = seq > self.answered
        if first:
            self.answered = seq
        self.on_durable(durable)
        return first

    def on_durable(self, seq: int) -> None:
        if seq > self.durable:
            self.durable = seq
        done = min(self.durable, self.answered)
        buf = self._buffer
        while buf and buf[0][0] <= done:
            buf.popleft()

    def on_push(self, stream: int, seq: int, max_streams: int = 64) -> PushVerdict:
        """Judge a pushed event. Owners may push one twice (across a failover) or, after a
        move, skip some the client never got: then the session asks its owner to FILL
        from the last one delivered. Stream 0 carries notices, never deduplicated."""
        if stream == 0:
            return PushVerdict.DELIVER
        last = self._streams.get(stream)
        if last is not None and seq <= last:
            return PushVerdict.DUPLICATE
        if last is not None and seq > last + 1:
            return PushVerdict.GAP
        if last is None and len(self._streams) >= max_streams:
            del self._streams[next(iter(self._streams))]
        self._streams[stream] = seq
        return PushVerdict.DELIVER

    def streams(self) -> list[tuple[int, int]]:
        """(stream, last seq delivered) for each stream this session follows."""
        return list(self._streams.items())

    def last_pushed(self, stream: int) -> int:
        return self._streams.get(stream, 0)

    def close(self) -> None:
        if self.state is not SessionState.CLOSED:
            self.transition(SessionState.CLOSED)
            self._buffer.clear()
