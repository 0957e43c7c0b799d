"""SWIM membership with Lifeguard refinements, as a sans-I/O state machine.

Feed it the clock and the messages that arrive (``tick``, ``receive``); it returns the
messages to send (``Outgoing``) and queues membership changes (``take_events``). It never
reads a clock, opens a socket or draws from a global random generator.

Everything that decides whether a member's state may change lives in
``_TRANSITIONS`` below: the one table, keyed by (current state, claimed state), that says
how the claimed incarnation must compare to the one we hold.

Lifeguard pieces: local health (missed acks and nacks slow our own probing and widen our
timeouts, so a struggling member stops accusing healthy ones), dynamic suspicion (the
suspicion timeout decays from ``suspicion_max`` to ``suspicion_min`` as independent
suspectors confirm), and the buddy system (a suspect is told about its suspicion in the
ping that probes it, so it can refute at once).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from server.swim_codec import (
    Ack,
    Addr,
    Member,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Rumor,
)

__all__ = [
    "Member",
    "MemberEvent",
    "MemberState",
    "Outgoing",
    "Swim",
    "SwimConfig",
]

ALIVE, SUSPECT, FAULTY = MemberState.ALIVE, MemberState.SUSPECT, MemberState.FAULTY
LEAVING, LEFT = MemberState.LEAVING, MemberState.LEFT
PROBED = frozenset({ALIVE, SUSPECT, LEAVING})  # members we ping
LIVE = frozenset({ALIVE, SUSPECT})  # members that own ring slots
DEAD = frozenset({FAULTY, LEFT})


class Needs(enum.Enum):
    NEWER = "newer"  # the claim must carry a strictly higher incarnation
    SAME = "same_or_newer"  # an equal incarnation is enough


N, S = Needs.NEWER, Needs.SAME

# (state we hold, state claimed) -> what the claimed incarnation must be. Equal
# incarnation: faulty/left beat suspect beat alive. LEAVING is "alive, draining": a
# suspicion at the same incarnation overrides it so a member that dies mid-drain still
# gets detected; the draining member refutes with a higher incarnation like anyone.
# fmt: off
_ROWS: dict[MemberState, dict[MemberState, Needs]] = {
    # held      {claimed: what its incarnation must be}
    ALIVE:    {ALIVE: N, SUSPECT: S, FAULTY: S, LEAVING: S, LEFT: S},
    SUSPECT:  {ALIVE: N, SUSPECT: N, FAULTY: S, LEAVING: N, LEFT: S},
    LEAVING:  {ALIVE: N, SUSPECT: S, FAULTY: S, LEAVING: N, LEFT: S},
    FAULTY:   {ALIVE: N, SUSPECT: N, FAULTY: N, LEAVING: N, LEFT: N},
    LEFT:     {ALIVE: N, SUSPECT: N, FAULTY: N, LEAVING: N, LEFT: N},
}
# fmt: on
_TRANSITIONS: dict[tuple[MemberState, MemberState], Needs] = {
    (held, claim): need for held, row in _ROWS.items() for claim, need in row.items()
}


def _accepts(held: Member, claim: Member) -> bool:
    if _TRANSITIONS[(held.state, claim.state)] is Needs.NEWER:
        return claim.incarnation > held.incarnation
    return claim.incarnation >= held.incarnation


@dataclass(frozen=True, slots=True)
class SwimConfig:
    # Shorter: faster detection, more packets per second per member.
    protocol_period: float = 0.2
    # Shorter: quicker escalation to ping-req, but slow-but-alive members look dead.
    # Must leave room in the period for the indirect round trip (ping-req, ping, ack, ack).
    ack_timeout: float = 0.08
    # More relays: fewer false suspicions under loss, more traffic per failed probe.
    indirect_probes: int = 3
    # A suspicion confirmed by ``suspicion_confirmations`` independent members expires after
    # suspicion_min; an unconfirmed one (typical for a live member behind loss) after
    # suspicion_max. min drives detection time of real failures, max the false-positive rate.
    suspicion_min: float = 0.5
    suspicion_max: float = 3.0
    suspicion_confirmations: int = 3
    # Times each update is piggybacked: retransmit_mult * ceil(log2(N + 1)). Higher: surer
    # dissemination under loss, bigger packets for longer.
    retransmit_mult: int = 3
    max_piggyback: int = 8  # updates per packet; bounds datagram size
    # Full-state TCP sync with a random member (also a dead one: that heals partitions).
    # Shorter: faster partition healing and repair of missed gossip, more TCP traffic.
    push_pull_interval: float = 10.0
    # Lifeguard: probe interval and ack timeout scale by (1 + health score), score capped
    # here. Higher cap: a sick member backs off further, but recovers more slowly.
    max_local_health: int = 8
    # Dead members are forgotten after these. Longer: late rumors cannot resurrect them,
    # but the table holds more. Must exceed the time a rumor keeps circulating.
    left_reap_after: float = 30.0
    faulty_reap_after: float = 60.0
    max_members: int = 4096
    # A leaving member gossips LEAVING this long, then LEFT.
    leave_linger: float = 0.3
    # With no live peer known, contact the seeds again this often.
    join_retry_interval: float = 0.25
    # A member's news about itself that changes the ring (its join, once it has the member
    # list; its refutation of the `left`/`faulty` a restarted or paused member finds the
    # cluster holding under its name) also goes at once, in a ping, to this many live
    # members, besides riding the next pings. 0: only with the pings.
    announce_fanout: int = 32
    # A gap between two ticks longer than this means our own process was stalled (GC,
    # SIGSTOP, VM pause): deadlines are shifted instead of blaming peers for our silence.
    pause_threshold: float = 1.0
    max_relays: int = 1024  # ping-reqs we relay at once; excess are dropped


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send ``message`` to ``addr``. ``push_pull``: do it as a TCP push-pull exchange; a
    PushPull with ``reply=True`` answers the request that produced it, on that connection."""

    addr: Addr
    message: Message
    push_pull: bool = False


@dataclass(frozen=True, slots=True)
class MemberEvent:
    member: Member  # the member after the change
    previous: MemberState | None  # None when newly seen


@dataclass(slots=True)
class _Probe:
    target: str
    addr: Addr
    ack_deadline: float
    end: float
    acked: bool = False
    indirect: int = 0  # ping-reqs sent, i.e. nacks expected
    nacks: int = 0


@dataclass(slots=True)
class _Pending:
    rumor: Rumor
    sent: int
    order: int  # negated enqueue counter: smaller is newer


@dataclass(slots=True)
class _Relay:
    requester: Addr
    requester_seq: int
    target: str
    nack_at: float


@dataclass(slots=True)
class _Suspicion:
    start: float
    origin: str
    deadline: float = math.inf
    confirmers: set[str] = field(default_factory=set)


class Swim:
    def __init__(
        self,
        name: str,
        addr: Addr,
        *,
        meta: Mapping[str, Any],
        seeds: Sequence[Addr],
        config: SwimConfig,
        rng: random.Random,
        now: float,
    ) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self._rng = rng
        self._seeds = [s for s in seeds if tuple(s) != tuple(addr)]
        self._announced = False  # our join told to the members (see _announce_self)
        self._back_from_dead = False  # we refuted a `left` or `faulty` held about us
        self._me = Member(name, addr, 0, ALIVE, dict(meta))
        self._members: dict[str, Member] = {name: self._me}
        self._since: dict[str, float] = {name: now}
        self._heard: dict[str, float] = {}
        self._last_heard = now
        self._suspicions: dict[str, _Suspicion] = {}
        self._queue: dict[str, _Pending] = {}  # one pending rumor per member: bounded
        self._enqueued = 0
        self._events: deque[MemberEvent] = deque(maxlen=4 * config.max_members)
        self._order: list[str] = []
        self._order_pos = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.randrange(1 << 30)
        self._health = 0
        self._last_tick = now
        self._next_probe = now + rng.uniform(0, config.protocol_period)
        self._next_push_pull = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._next_join = now
        self._next_reap = now + config.protocol_period
        self._leave_at: float | None = None
        self.rejoined_count = 0  # times we learned the cluster had declared us FAULTY

    # -- public view ----------------------------------------------------------------------

    @property
    def members(self) -> Mapping[str, Member]:
        return self._members

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def local_health(self) -> int:
        return self._health

    @property
    def leave_complete(self) -> bool:
        """True once we are LEFT and have gossiped it fully: the process may now exit."""
        return self._me.state is LEFT and self.name not in self._queue

    def live_members(self) -> list[Member]:
        return sorted((m for m in self._members.values() if m.state in LIVE), key=_name)

    def checksum(self) -> str:
        h = hashlib.sha256()
        for m in sorted(self._members.values(), key=_name):
            h.update(f"{m.name}\x00{m.incarnation}\x00{m.state.value}\n".encode())
        return h.hexdigest()[:16]

    def take_events(self) -> list[MemberEvent]:
        """Changes since the last call, oldest first. Call after every input: the backlog
        is bounded (4 x max_members) and the oldest events are dropped beyond it."""
        events = list(self._events)
        self._events.clear()
        return events

    # -- inputs ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Outgoing]:
        """Join: push-pull with up to three seeds (retried by ``tick`` until a peer answers)."""
        self._emit(self._me, None)
        self._enqueue(Rumor(self._me, self.name))
        return self._join(now)

    def tick(self, now: float) -> list[Outgoing]:
        """Drive timers; call at ``next_deadline()`` (or more often) and send what it returns."""
        out: list[Outgoing] = []
        gap = now - self._last_tick
        self._last_tick = now
        if gap > self.config.pause_threshold:
            self._shift_deadlines(gap)
        self._finish_probes(now, out)
        self._expire_relays(now, out)
        self._expire_suspicions(now)
        if self._leave_at is not None and now >= self._leave_at and self._me.state is LEAVING:
            self._set_self(replace(self._me, state=LEFT))
            out.extend(self._announce_departure())
        if now >= self._next_probe:
            self._next_probe = now + self.config.protocol_period * self._multiplier()
            self._probe_next(now, out)
        if now >= self._next_join and not self._has_peers():
            out.extend(self._join(now))
        if now >= self._next_push_pull:
            self._next_push_pull = now + self.config.push_pull_interval
            self._push_pull(out)
        if now >= self._next_reap:
            self._next_reap = now + self.config.protocol_period
            self._reap(now)
        return out

    def next_deadline(self) -> float:
        """When ``tick`` next has something to do (a probe, a timeout, a reap). Anything fed
        in through ``receive``, ``leave`` or ``probe_now`` may make it earlier."""
        due = min(self._next_probe, self._next_push_pull, self._next_reap)
        for probe in self._probes.values():
            if probe.acked:  # done: clear it now (probe_now skips a target still probed)
                return -math.inf
            due = min(due, probe.end if probe.indirect else probe.ack_deadline)
        for relay in self._relays.values():
            due = min(due, relay.nack_at)
        for suspicion in self._suspicions.values():
            due = min(due, suspicion.deadline)
        if self._leave_at is not None and self._me.state is LEAVING:
            due = min(due, self._leave_at)
        if not self._has_peers():
            due = min(due, self._next_join)
        return due

    def receive(self, now: float, addr: Addr, message: Message) -> list[Outgoing]:
        """Feed one authenticated message from ``addr`` (replies go there). For a PushPull
        request the answer is a PushPull with ``reply=True``: write it on that connection."""
        out: list[Outgoing] = []
        sender = message.sender
        if sender != self.name and sender in self._members:
            if now - self._last_heard > self.config.suspicion_min:
                # We were cut off: suspicions we formed meanwhile say more about us than
                # about them. Give them a fresh timeout now that we can hear refutations.
                for s in self._suspicions.values():
                    s.start = now
                    self._set_deadline(s)
            self._heard[sender] = self._last_heard = now
        match message:
            case Ping():
                self._absorb(now, message.rumors)
                if message.target == self.name:
                    me = self._me
                    stale = any(
                        r.member.name == self.name
                        and (r.member.incarnation, r.member.state) != (me.incarnation, me.state)
                        for r in message.rumors
                    )
                    rumors = self._piggyback(about=sender, assert_self=stale)
                    out.append(Outgoing(addr, Ack(message.seq, self.name, rumors)))
            case Ack():
                self._absorb(now, message.rumors)
                self._on_ack(message, out)
            case Nack():
                probe = self._probes.get(message.seq)
                if probe is not None:
                    probe.nacks += 1
            case PingReq():
                self._absorb(now, message.rumors)
                self._relay(now, addr, message, out)
            case PushPull():
                self._merge(now, message)
                if not message.reply:
                    reply = PushPull(self.name, self.addr, tuple(self._members.values()), True)
                    out.append(Outgoing(addr, reply, push_pull=True))
        back, self._back_from_dead = self._back_from_dead, False
        joined = not self._announced and isinstance(message, PushPull) and message.reply
        if self._me.state is ALIVE and (joined or back):
            announcement = self._announce_self()
            self._announced = self._announced or bool(announcement)
            out.extend(announcement)
        return out

    def _announce_self(self) -> list[Outgoing]:
        """Tell the live members our record now: we just joined (the first answer to our
        join that names other members; the join itself reached only the seeds), or we came back
        from `left` or `faulty` (a member restarted under its old name starts at incarnation
        0, which the cluster's `left` record beats; a paused one was dropped). Until the
        members hear it they leave us out of the ring while we count ourselves in, and an
        actor owned by us in one view and by another member in the other moves back and
        forth between the two. A refuted suspicion does not change the ring: it goes with
        the pings, as SWIM has it (announcing those too costs most under packet loss, when
        members refute the most)."""
        rumors = (Rumor(self._me, self.name),)
        peers = self._random_peers(self.config.announce_fanout, exclude=(), states=set(PROBED))
        return [Outgoing(m.addr, Ping(self._next_seq(), self.name, m.name, rumors)) for m in peers]

    def _announce_departure(self) -> list[Outgoing]:
        """Our LEFT, to the live members at once: a process waits for its departure to be
        spread before it exits (`leave_complete`), and the pings alone take
        retransmit_mult * log2(N) periods, longer than a stop waits (a gateway's restart
        needs its ports freed). Told to every member we know (none, for the last one), the
        rumor has nothing left to do; past `announce_fanout` members, it rides the pings."""
        out = self._announce_self()
        if len(out) == sum(1 for m in self._members.values() if m.state in PROBED and m.name != self.name):
            self._queue.pop(self.name, None)
        return out

    def leave(self, now: float, linger: float | None = None) -> list[Outgoing]:
        """Gossip LEAVING now, LEFT after ``linger`` (default ``leave_linger``). Keep calling
        ``tick`` (and answering pings) until ``leave_complete``, then stop."""
        if self._me.state in (LEAVING, LEFT):
            return []
        self._set_self(replace(self._me, incarnation=self._me.incarnation + 1, state=LEAVING))
        self._leave_at = now + (self.config.leave_linger if linger is None else linger)
        peers = self._random_peers(self.config.indirect_probes, exclude=(), states={ALIVE})
        return [self._ping(m) for m in peers]

    def probe_now(self, name: str, now: float) -> list[Outgoing]:
        """Fast evidence (a link to ``name`` broke): probe it at once. A failed probe only
        makes it SUSPECT; the suspicion timeout still decides."""
        member = self._members.get(name)
        if name == self.name or member is None or member.state not in PROBED:
            return []
        if any(p.target == name for p in self._probes.values()):
            return []
        out: list[Outgoing] = []
        self._start_probe(now, member, out)
        return out

    def set_meta(self, meta: Mapping[str, Any]) -> None:
        """Publish new metadata (it travels with a bumped incarnation)."""
        self._set_self(replace(self._me, incarnation=self._me.incarnation + 1, meta=dict(meta)))

    # -- probing --------------------------------------------------------------------------

    def _multiplier(self) -> int:
        return self._health + 1

    def _adjust_health(self, delta: int) -> None:
        self._health = min(self.config.max_local_health, max(0, self._health + delta))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def _ping(self, member: Member) -> Outgoing:
        seq = self._next_seq()
        return Outgoing(member.addr, Ping(seq, self.name, member.name, self._piggyback(member.name)))

    def _probe_next(self, now: float, out: list[Outgoing]) -> None:
        for _ in range(2):  # at most one reshuffle per call
            while self._order_pos < len(self._order):
                name = self._order[self._order_pos]
                self._order_pos += 1
                member = self._members.get(name)
                if member is not None and member.state in PROBED:
                    if not any(p.target == name for p in self._probes.values()):
                        self._start_probe(now, member, out)
                    return
            self._order = [n for n, m in self._members.items() if n != self.name and m.state in PROBED]
            self._rng.shuffle(self._order)
            self._order_pos = 0
            if not self._order:
                return

    def _start_probe(self, now: float, member: Member, out: list[Outgoing]) -> None:
        mult = self._multiplier()
        ping = self._ping(member)
        assert isinstance(ping.message, Ping)
        self._probes[ping.message.seq] = _Probe(
            member.name,
            member.addr,
            now + self.config.ack_timeout * mult,
            now + self.config.protocol_period * mult,
        )
        out.append(ping)

    def _on_ack(self, ack: Ack, out: list[Outgoing]) -> None:
        probe = self._probes.get(ack.seq)
        if probe is not None and ack.sender == probe.target:
            probe.acked = True
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None and ack.sender == relay.target:
            rumors = self._piggyback()
            out.append(Outgoing(relay.requester, Ack(relay.requester_seq, ack.sender, rumors)))

    def _finish_probes(self, now: float, out: list[Outgoing]) -> None:
        for seq, probe in list(self._probes.items()):
            if probe.acked:
                del self._probes[seq]
                self._adjust_health(-1)
            elif now >= probe.end:
                del self._probes[seq]
                missed = probe.indirect - probe.nacks if probe.indirect else 1
                self._adjust_health(missed)
                self._probe_failed(now, probe.target, out)
            elif now >= probe.ack_deadline and not probe.indirect:
                relays = self._random_peers(
                    self.config.indirect_probes, exclude=(probe.target,), states={ALIVE}
                )
                for relay in relays:
                    req = PingReq(seq, self.name, probe.target, probe.addr, self._piggyback())
                    out.append(Outgoing(relay.addr, req))
                probe.indirect = len(relays)

    def _probe_failed(self, now: float, name: str, out: list[Outgoing]) -> None:
        member = self._members.get(name)
        if member is None or member.state not in PROBED or self._me.state is not ALIVE:
            return
        self._apply(now, Rumor(replace(member, state=SUSPECT), self.name))
        if self._members[name].state is SUSPECT:
            # Buddy system: tell the suspect right away so it can refute before others act;
            # and tell a few others, so independent confirmations meet sooner.
            out.append(self._ping(self._members[name]))
            k = self.config.indirect_probes
            for peer in self._random_peers(k, exclude=(name,), states={ALIVE}):
                out.append(self._ping(peer))

    def _relay(self, now: float, addr: Addr, req: PingReq, out: list[Outgoing]) -> None:
        if len(self._relays) >= self.config.max_relays:
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(addr, req.seq, req.target, now + self.config.ack_timeout)
        out.append(Outgoing(req.target_addr, Ping(seq, self.name, req.target, self._piggyback())))

    def _expire_relays(self, now: float, out: list[Outgoing]) -> None:
        for seq, relay in list(self._relays.items()):
            if now >= relay.nack_at:
                del self._relays[seq]
                out.append(Outgoing(relay.requester, Nack(relay.requester_seq, self.name)))

    def _random_peers(self, k: int, *, exclude: Sequence[str], states: set[MemberState]) -> list[Member]:
        pool = [
            m
            for m in self._members.values()
            if m.name != self.name and m.name not in exclude and m.state in states
        ]
        return self._rng.sample(pool, min(k, len(pool)))

    # -- suspicion ------------------------------------------------------------------------

    def _suspect(self, now: float, name: str, origin: str) -> None:
        self._suspicions[name] = s = _Suspicion(now, origin)
        self._set_deadline(s)

    def _set_deadline(self, s: _Suspicion) -> None:
        # Lifeguard: max - (max - min) * log(c + 1) / log(k + 1) for c confirmations.
        cfg = self.config
        live = sum(1 for m in self._members.values() if m.state in LIVE)
        k = min(cfg.suspicion_confirmations, live - 2)
        timeout = cfg.suspicion_min
        if k > 0:
            frac = math.log(len(s.confirmers) + 1) / math.log(k + 1)
            timeout = max(timeout, cfg.suspicion_max - (cfg.suspicion_max - cfg.suspicion_min) * frac)
        s.deadline = s.start + timeout

    def _expire_suspicions(self, now: float) -> None:
        for name, s in list(self._suspicions.items()):
            if now < s.deadline:
                continue
            if self._isolated(since=s.start, suspect=name):
                # Nobody else has answered us either: we are the likely failure. Keep
                # suspecting, but do not declare anyone dead on such evidence.
                s.start = now
                self._set_deadline(s)
                continue
            self._apply(now, Rumor(replace(self._members[name], state=FAULTY), self.name))

    def _isolated(self, *, since: float, suspect: str) -> bool:
        others = [n for n, m in self._members.items() if n not in (self.name, suspect) and m.state in LIVE]
        if not others:
            return False
        return not any(self._heard.get(n, -math.inf) >= since for n in others)

    # -- dissemination --------------------------------------------------------------------

    def _enqueue(self, rumor: Rumor) -> None:
        self._enqueued += 1
        self._queue[rumor.member.name] = _Pending(rumor, 0, -self._enqueued)

    def _transmit_limit(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log2(len(self._members) + 1)))

    def _piggyback(self, about: str | None = None, *, assert_self: bool = False) -> tuple[Rumor, ...]:
        picked: list[Rumor] = []
        first = self._members.get(about) if about is not None else None
        if first is not None and first.state in (SUSPECT, FAULTY, LEFT):
            # The peer we talk to is suspected or declared dead by us: say so, so it can
            # refute (suspect) or rejoin (faulty, e.g. after a pause). Keep the suspector's
            # name: relaying a suspicion must not count as confirming it.
            s = self._suspicions.get(first.name)
            picked.append(Rumor(first, s.origin if s is not None else self.name))
        if assert_self:
            # The peer holds stale news about us; our refutation may have left our queue.
            picked.append(Rumor(self._me, self.name))
        if self._queue:
            limit = self._transmit_limit()
            budget = self.config.max_piggyback - len(picked)
            # Urgent first, then least sent, then newest.
            for p in heapq.nsmallest(budget, self._queue.values(), key=_priority):
                name = p.rumor.member.name
                if picked and (name == about or name == self.name and assert_self):
                    continue
                picked.append(p.rumor)
                p.sent += 1
                if p.sent >= limit:
                    del self._queue[name]
        return tuple(picked)

    def _absorb(self, now: float, rumors: Sequence[Rumor]) -> None:
        for rumor in rumors:
            self._apply(now, rumor)

    def _apply(self, now: float, rumor: Rumor, *, confirms: bool = True) -> None:
        claim = rumor.member
        if claim.name == self.name:
            self._refute(rumor)
            return
        held = self._members.get(claim.name)
        if held is None:
            if claim.state in DEAD or not self._make_room(now):
                return
            self._store(now, claim, None)
            self._enqueue(rumor)
            if claim.state is SUSPECT:
                self._suspect(now, claim.name, rumor.origin)
            return
        if not _accepts(held, claim):
            if (
                confirms
                and claim.state is SUSPECT
                and held.state is SUSPECT
                and claim.incarnation == held.incarnation
            ):
                self._confirm(claim.name, rumor)
            return
        self._store(now, claim, held.state)
        self._enqueue(rumor)
        if claim.state is SUSPECT:
            self._suspect(now, claim.name, rumor.origin)
        else:
            self._suspicions.pop(claim.name, None)

    def _confirm(self, name: str, rumor: Rumor) -> None:
        s = self._suspicions.get(name)
        if s is None or rumor.origin == s.origin or rumor.origin in s.confirmers:
            return
        if len(s.confirmers) < self.config.suspicion_confirmations:
            s.confirmers.add(rumor.origin)
            self._set_deadline(s)
            self._enqueue(rumor)  # spread the independent confirmation

    def _store(self, now: float, member: Member, previous: MemberState | None) -> None:
        self._members[member.name] = member
        self._since[member.name] = now
        if previous is None or previous not in PROBED and member.state in PROBED:
            # SWIM: a new member goes to a random place in the round-robin order.
            self._order.insert(self._rng.randint(self._order_pos, len(self._order)), member.name)
        self._emit(member, previous)

    def _emit(self, member: Member, previous: MemberState | None) -> None:
        self._events.append(MemberEvent(member, previous))

    def _refute(self, rumor: Rumor) -> None:
        claim, me = rumor.member, self._me
        if claim.incarnation < me.incarnation:
            return
        if claim.state is me.state and claim.incarnation == me.incarnation:
            return
        if claim.state is ALIVE and claim.incarnation == me.incarnation:
            return
        if claim.state in DEAD:
            self._back_from_dead = True
        if claim.state is FAULTY and me.state is ALIVE:
            # The cluster dropped us (we were paused or partitioned away). Say so once,
            # withdraw the accusations we made while cut off, and come back.
            self._emit(replace(me, incarnation=claim.incarnation, state=FAULTY), ALIVE)
            self.rejoined_count += 1
            self._withdraw_lone_suspicions()
            self._set_self(replace(me, incarnation=claim.incarnation + 1), previous=FAULTY)
            return
        if claim.state is SUSPECT:
            self._adjust_health(1)  # Lifeguard: being suspected hints that we are slow
        self._set_self(replace(me, incarnation=claim.incarnation + 1))

    def _withdraw_lone_suspicions(self) -> None:
        for name, s in list(self._suspicions.items()):
            if s.origin == self.name and not s.confirmers:
                del self._suspicions[name]
                self._queue.pop(name, None)
                member = self._members[name]
                self._members[name] = replace(member, state=ALIVE)
                self._emit(self._members[name], SUSPECT)

    def _set_self(self, me: Member, previous: MemberState | None = None) -> None:
        prev = self._me.state if previous is None else previous
        self._me = me
        self._members[self.name] = me
        self._enqueue(Rumor(me, self.name))
        if prev is not me.state or previous is not None:
            self._emit(me, prev)

    # -- join, push-pull, reaping ---------------------------------------------------------

    def _has_peers(self) -> bool:
        return any(n != self.name and m.state in PROBED for n, m in self._members.items())

    def _join(self, now: float) -> list[Outgoing]:
        self._next_join = now + self.config.join_retry_interval
        seeds = self._rng.sample(self._seeds, min(3, len(self._seeds)))
        msg = PushPull(self.name, self.addr, tuple(self._members.values()), join=True)
        return [Outgoing(seed, msg, push_pull=True) for seed in seeds]

    def _push_pull(self, out: list[Outgoing]) -> None:
        if self._me.state is not ALIVE:
            return
        peers = self._random_peers(1, exclude=(), states={ALIVE, SUSPECT, FAULTY, LEAVING})
        if peers:
            msg = PushPull(self.name, self.addr, tuple(self._members.values()))
            out.append(Outgoing(peers[0].addr, msg, push_pull=True))

    def _merge(self, now: float, pp: PushPull) -> None:
        for member in pp.members:
            if member.state is FAULTY:
                # A full-state sync never kills directly: the member gets the chance to
                # refute a suspicion. This is what heals a partition without a cascade.
                member = replace(member, state=SUSPECT)
            # The sender relays what it holds, it did not probe: no confirmation.
            self._apply(now, Rumor(member, pp.sender), confirms=False)

    def _make_room(self, now: float) -> bool:
        if len(self._members) < self.config.max_members:
            return True
        dead = [n for n, m in self._members.items() if m.state in DEAD]
        if not dead:
            return False
        self._forget(min(dead, key=lambda n: self._since[n]))
        return True

    def _reap(self, now: float) -> None:
        cfg = self.config
        for name, m in list(self._members.items()):
            age = now - self._since[name]
            if (m.state is FAULTY and age >= cfg.faulty_reap_after) or (
                m.state is LEFT and age >= cfg.left_reap_after and name != self.name
            ):
                self._forget(name)

    def _forget(self, name: str) -> None:
        del self._members[name]
        del self._since[name]
        self._heard.pop(name, None)
        self._suspicions.pop(name, None)
        self._queue.pop(name, None)

    def _shift_deadlines(self, gap: float) -> None:
        for p in self._probes.values():
            p.ack_deadline += gap
            p.end += gap
        for r in self._relays.values():
            r.nack_at += gap
        for s in self._suspicions.values():
            s.start += gap
            s.deadline += gap
        self._next_probe += gap
        for name in self._heard:
            self._heard[name] += gap
        self._last_heard += gap


def _name(m: Member) -> str:
    return m.name


def _priority(p: _Pending) -> tuple[bool, int, int]:
    # Accusations, deaths, leaves and refutations (ALIVE above incarnation 0) go before
    # join news: delaying a join is harmless, delaying a refutation makes a false positive.
    m = p.rumor.member
    routine = m.state is ALIVE and m.incarnation == 0
    return (routine, p.sent, p.order)
