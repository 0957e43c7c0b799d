"""SWIM state machine, driven through an in-process network with a simulated clock.

The network routes ``Outgoing`` between ``Swim`` instances with a seeded RNG for loss and
delay, and can crash, pause or partition members. Nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Callable
from dataclasses import replace

from server.swim import (
    _TRANSITIONS,
    Member,
    MemberEvent,
    MemberState,
    Outgoing,
    Swim,
    SwimConfig,
)
from server.swim_codec import Ack, Message, Ping, PushPull, Rumor, decode, encode

ALIVE, SUSPECT, FAULTY = MemberState.ALIVE, MemberState.SUSPECT, MemberState.FAULTY
LEAVING, LEFT = MemberState.LEAVING, MemberState.LEFT
CFG = SwimConfig()
PERIOD = CFG.protocol_period


class SimNet:
    def __init__(
        self,
        n: int,
        *,
        seed: int,
        loss: float = 0.0,
        config: SwimConfig = CFG,
        delay: tuple[float, float] = (0.001, 0.005),
        n_seeds: int = 3,
        key: bytes | None = None,
        dt: float = 0.02,
        deadline_ticks: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.delay, self.key, self.dt = loss, delay, key, dt
        self.deadline_ticks = deadline_ticks  # tick a member only once its next_deadline() is due
        self.before_tick: Callable[[str], None] | None = None
        self.now = 0.0
        self.names = [f"n{i:03d}" for i in range(n)]
        self.addr = {name: ("10.0.0.1", 7000 + i) for i, name in enumerate(self.names)}
        self.by_addr = {a: name for name, a in self.addr.items()}
        seeds = [self.addr[name] for name in self.names[:n_seeds]]
        self.nodes = {
            name: Swim(
                name,
                self.addr[name],
                meta={"role": "node"},
                seeds=seeds,
                config=config,
                rng=random.Random(f"{seed}:{name}"),
                now=0.0,
            )
            for name in self.names
        }
        self.started: set[str] = set()
        self.crashed: set[str] = set()
        self.paused: set[str] = set()
        self.group: dict[str, int] = {}
        self.log: list[tuple[float, str, MemberEvent]] = []  # (time, observer, event)
        self._heap: list[tuple[float, int, str, str, Message, bool]] = []
        self._n = 0
        self.packets = 0

    # -- plumbing -------------------------------------------------------------------------

    def up(self, name: str) -> bool:
        return name in self.started and name not in self.crashed

    def _reachable(self, src: str, dst: str) -> bool:
        if not (self.up(src) and self.up(dst)) or src in self.paused or dst in self.paused:
            return False
        return self.group.get(src, 0) == self.group.get(dst, 0)

    def send(self, src: str, outs: list[Outgoing]) -> None:
        for out in outs:
            dst = self.by_addr.get(out.addr)
            if dst is None:
                continue
            self.packets += 1
            # Push-pull rides TCP: no random loss, but partitions and crashes still cut it.
            if not out.push_pull and self.rng.random() < self.loss:
                continue
            msg = out.message
            if self.key is not None:
                msg = decode(encode(msg, self.key), self.key)
            self._n += 1
            at = self.now + self.rng.uniform(*self.delay)
            heapq.heappush(self._heap, (at, self._n, src, dst, msg, out.push_pull))

    def start(self, name: str) -> None:
        self.started.add(name)
        self.send(name, self.nodes[name].start(self.now))

    def step(self) -> None:
        # Packets are handled at their own arrival time, timers only at tick granularity,
        # as in the asyncio adapter.
        end = self.now + self.dt
        while self._heap and self._heap[0][0] <= end:
            at, _, src, dst, msg, _ = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            if self._reachable(src, dst):
                self.send(dst, self.nodes[dst].receive(self.now, self.addr[src], msg))
        self.now = end
        for name in self.names:
            if self.up(name):
                if self.before_tick is not None:
                    self.before_tick(name)
                if self.deadline_ticks and self.now < self.nodes[name].next_deadline():
                    continue
                self.send(name, self.nodes[name].tick(self.now))
                for ev in self.nodes[name].take_events():
                    self.log.append((self.now, name, ev))

    def run(self, seconds: float, until=None, check_every: float = PERIOD) -> float | None:
        """Run up to ``seconds``; return the elapsed time at which ``until()`` held, if any."""
        start, next_check = self.now, self.now
        while self.now - start < seconds:
            self.step()
            if until is not None and self.now >= next_check:
                next_check = self.now + check_every
                if until():
                    return self.now - start
        return None

    # -- views ----------------------------------------------------------------------------

    def live(self) -> list[str]:
        return [n for n in self.names if self.up(n)]

    def state_of(self, subject: str, observers: list[str] | None = None) -> set[MemberState | None]:
        obs = self.live() if observers is None else observers
        views = (self.nodes[o].members.get(subject) for o in obs if o != subject)
        return {m.state if m is not None else None for m in views}

    def converged(self, expect: int | None = None) -> bool:
        live = self.live()
        sums = {self.nodes[n].checksum() for n in live}
        if len(sums) != 1:
            return False
        return expect is None or len(self.nodes[live[0]].live_members()) == expect

    def boot(self, deadline: float = 20.0) -> float:
        for name in self.names:
            self.start(name)
        self.run(0.1)
        # Shortcut the join storm: every member gets the first seed's full table, as its
        # next periodic push-pull would give it.
        seed = self.names[0]
        table = PushPull(seed, self.addr[seed], tuple(self.nodes[seed].members.values()), True)
        for name in self.names[1:]:
            self.send(name, self.nodes[name].receive(self.now, self.addr[seed], table))
        took = self.run(deadline, until=lambda: self.converged(len(self.names)), check_every=0.5)
        assert took is not None, "cluster did not converge after boot"
        return took

    def faulty_events(self, subject: str | None = None) -> list[tuple[float, str, MemberEvent]]:
        return [
            (t, obs, ev)
            for t, obs, ev in self.log
            if ev.member.state is FAULTY and (subject is None or ev.member.name == subject)
        ]


# -- transition table -------------------------------------------------------------------


def test_transition_table_covers_every_pair_and_orders_equal_incarnations() -> None:
    assert len(_TRANSITIONS) == len(MemberState) ** 2
    swim = Swim("a", ("h", 1), meta={}, seeds=[], config=CFG, rng=random.Random(1), now=0.0)
    swim.start(0.0)

    def claim(state: MemberState, inc: int) -> None:
        rumor = Rumor(Member("b", ("h", 2), inc, state, {}), "c")
        swim.receive(0.0, ("h", 3), Ack(0, "c", (rumor,)))

    claim(ALIVE, 3)
    claim(ALIVE, 2)  # older: ignored
    assert swim.members["b"].incarnation == 3
    claim(SUSPECT, 3)  # equal incarnation: suspect beats alive
    assert swim.members["b"].state is SUSPECT
    claim(ALIVE, 3)  # refutation needs a higher incarnation
    assert swim.members["b"].state is SUSPECT
    claim(FAULTY, 3)  # equal incarnation: faulty beats suspect
    assert swim.members["b"].state is FAULTY
    claim(SUSPECT, 3)
    claim(LEFT, 3)  # nothing overrides faulty at the same incarnation
    assert swim.members["b"].state is FAULTY
    claim(ALIVE, 4)  # a rejoin
    assert swim.members["b"].state is ALIVE
    events = [(e.member.state, e.previous) for e in swim.take_events() if e.member.name == "b"]
    assert events == [(ALIVE, None), (SUSPECT, ALIVE), (FAULTY, SUSPECT), (ALIVE, FAULTY)]


def test_same_view_same_checksum_regardless_of_arrival_order() -> None:
    members = [Member(f"m{i}", ("h", i), i % 3, ALIVE, {"i": i}) for i in range(1, 8)]

    def view(order: list[Member], seed: int) -> Swim:
        swim = Swim("m0", ("h", 0), meta={}, seeds=[], config=CFG, rng=random.Random(seed), now=0.0)
        swim.start(0.0)
        swim.receive(0.0, ("h", 1), PushPull("m1", ("h", 1), tuple(order), reply=True))
        return swim

    a = view(members, 1)
    b = view(list(reversed(members)), 2)
    assert a.checksum() == b.checksum()
    assert [m.name for m in a.live_members()] == [f"m{i}" for i in range(8)]
    bumped = [replace(m, incarnation=9) if m.name == "m3" else m for m in members]
    assert view(bumped, 3).checksum() != a.checksum()


def test_member_table_is_bounded() -> None:
    cfg = SwimConfig(max_members=5)
    swim = Swim("m0", ("h", 0), meta={}, seeds=[], config=cfg, rng=random.Random(1), now=0.0)
    swim.start(0.0)
    many = tuple(Member(f"m{i}", ("h", i), 0, ALIVE, {}) for i in range(1, 50))
    swim.receive(0.0, ("h", 1), PushPull("m1", ("h", 1), many, reply=True))
    assert len(swim.members) == 5


def test_learning_it_was_declared_faulty_emits_once_and_rejoins() -> None:
    swim = Swim("me", ("h", 0), meta={}, seeds=[], config=CFG, rng=random.Random(1), now=0.0)
    swim.start(0.0)
    swim.take_events()
    dead_me = Rumor(Member("me", ("h", 0), 0, FAULTY, {}), "other")
    for _ in range(3):  # the rumor keeps circulating; only the first one counts
        swim.receive(1.0, ("h", 1), Ack(7, "other", (dead_me,)))
    mine = [e for e in swim.take_events() if e.member.name == "me"]
    assert [(e.member.state, e.previous) for e in mine] == [(FAULTY, ALIVE), (ALIVE, FAULTY)]
    assert swim.rejoined_count == 1
    assert swim.incarnation == 1
    assert swim.members["me"].state is ALIVE


def test_ping_for_another_name_is_not_acked() -> None:
    # A restarted process on a reused port must not answer for the member that died there.
    swim = Swim("new", ("h", 0), meta={}, seeds=[], config=CFG, rng=random.Random(1), now=0.0)
    swim.start(0.0)
    assert swim.receive(0.0, ("h", 1), Ping(1, "x", "old")) == []
    [out] = swim.receive(0.0, ("h", 1), Ping(2, "x", "new"))
    assert isinstance(out.message, Ack) and out.message.seq == 2 and out.addr == ("h", 1)


def _quiet_member(**overrides: float) -> Swim:
    """A member that does not probe on its own, fed five peers at t=0."""
    cfg = SwimConfig(protocol_period=1000.0, push_pull_interval=1000.0, pause_threshold=100.0)
    swim = Swim("me", ("h", 0), meta={}, seeds=[], config=cfg, rng=random.Random(1), now=0.0)
    swim.start(0.0)
    peers = tuple(Member(n, ("h", i + 1), 0, ALIVE, {}) for i, n in enumerate("abcdx"))
    swim.receive(0.0, ("h", 1), PushPull("a", ("h", 1), peers, reply=True))
    return swim


def _suspect_x(origin: str) -> Ack:
    return Ack(0, origin, (Rumor(Member("x", ("h", 5), 0, SUSPECT, {}), origin),))


def test_independent_confirmations_shorten_suspicion() -> None:
    swim = _quiet_member()
    swim.receive(1.0, ("h", 1), _suspect_x("a"))
    for peer in "bcd":  # three more members suspect x on their own
        swim.receive(1.0, ("h", 2), _suspect_x(peer))
    swim.tick(1.0 + CFG.suspicion_min + 0.01)
    assert swim.members["x"].state is FAULTY


def test_relayed_suspicion_is_not_a_confirmation() -> None:
    swim = _quiet_member()
    swim.receive(1.0, ("h", 1), _suspect_x("a"))
    suspect_x = Member("x", ("h", 5), 0, SUSPECT, {})
    for peer in "bcd":  # they only hold a's suspicion and sync it to us
        table = (*swim.members.values(), suspect_x)
        swim.receive(1.0, ("h", 2), PushPull(peer, ("h", 2), table, reply=True))
        swim.receive(1.0, ("h", 2), Ack(0, peer, (Rumor(suspect_x, "a"),)))
    swim.tick(1.0 + CFG.suspicion_min + 0.01)
    assert swim.members["x"].state is SUSPECT
    swim.tick(1.0 + CFG.suspicion_max + 0.01)
    assert swim.members["x"].state is FAULTY


# -- simulated clusters -----------------------------------------------------------------


def test_crash_detected_by_all_200_members_under_loss() -> None:
    net = SimNet(200, seed=7, loss=0.05)
    net.boot()
    victim = "n123"
    net.crashed.add(victim)
    took = net.run(40 * PERIOD, until=lambda: net.state_of(victim) == {FAULTY}, check_every=PERIOD / 2)
    print(f"\n200 members, 5% loss: crash known FAULTY everywhere after {took} s")
    # Bound: ~2 periods until someone probes it and fails, suspicion_min once confirmed
    # (~3 periods to gather confirmations), then dissemination in O(log N) periods
    # (log2 200 ~ 8). That is ~16 periods; 40 leaves room for loss and bad luck.
    assert took is not None and took < 40 * PERIOD
    assert [e for e in net.faulty_events() if e[2].member.name != victim] == []


def test_no_false_positives_over_ten_minutes_with_loss() -> None:
    net = SimNet(24, seed=11, loss=0.05, dt=0.025)
    net.boot()
    net.run(600.0)
    assert net.faulty_events() == []
    suspected = {ev.member.name for _, _, ev in net.log if ev.member.state is SUSPECT}
    # The loss must actually have produced suspicions that were refuted, or this test
    # proves nothing about refutation.
    assert suspected
    assert any(net.nodes[n].incarnation > 0 for n in suspected)
    assert net.converged(24)
    assert all(m.state is ALIVE for m in net.nodes["n000"].members.values())


def test_partition_heals_into_one_view() -> None:
    net = SimNet(16, seed=3, loss=0.01)
    net.boot()
    left, right = net.names[:8], net.names[8:]
    net.group = {n: (0 if n in left else 1) for n in net.names}
    net.run(10.0)
    assert net.state_of(right[0], left) == {FAULTY}
    assert net.state_of(left[0], right) == {FAULTY}
    net.group = {}
    bound = 2 * CFG.push_pull_interval + 5.0
    took = net.run(bound, until=lambda: net.converged(16), check_every=0.25)
    print(f"\npartition of 16 healed into one view after {took} s")
    assert took is not None and took < bound
    view = net.nodes["n000"].members
    assert all(m.state is ALIVE for m in view.values())


def test_suspected_live_member_refutes() -> None:
    net = SimNet(10, seed=5, key=b"cluster-key")  # also runs every packet through the codec
    net.boot()
    x, accuser = "n004", "n001"
    rumor = Rumor(replace(net.nodes[accuser].members[x], state=SUSPECT), "n002")
    net.send("n002", [Outgoing(net.addr[accuser], Ping(1, "n002", accuser, (rumor,)))])
    took = net.run(
        CFG.suspicion_max,
        until=lambda: (
            net.state_of(x) == {ALIVE} and {net.nodes[o].members[x].incarnation for o in net.live()} == {1}
        ),
    )
    assert any(ev.member.name == x and ev.member.state is SUSPECT for _, _, ev in net.log)
    assert took is not None
    assert net.nodes[x].incarnation == 1
    assert net.faulty_events() == []


def test_graceful_leave_is_never_seen_as_faulty() -> None:
    net = SimNet(10, seed=9, loss=0.05)
    net.boot()
    x = "n006"
    net.send(x, net.nodes[x].leave(net.now))
    assert net.run(10.0, until=lambda: net.nodes[x].leave_complete) is not None
    net.crashed.add(x)  # the process exits
    net.run(3 * CFG.suspicion_max)
    assert net.state_of(x) == {LEFT}
    assert any(ev.member.state is LEAVING and o != x for _, o, ev in net.log)
    assert net.faulty_events() == []
    assert x not in [m.name for m in net.nodes["n000"].live_members()]


def _leave(
    announce_fanout: int, members: int = 10, linger: float | None = None, leaver: str = "n003"
) -> tuple[float, set[MemberState | None]]:
    """A member leaves: how long until its leave is complete (its process may exit), and
    what the others hold of it then."""
    net = SimNet(members, seed=17, config=replace(CFG, announce_fanout=announce_fanout))
    net.boot()
    x = leaver
    net.send(x, net.nodes[x].leave(net.now, linger))
    took = net.run(10.0, until=lambda: net.nodes[x].leave_complete, check_every=0.0)
    assert took is not None
    net.run(0.02)  # what it sent on its way out arrives (the simulation drops a crashed sender's packets)
    net.crashed.add(x)
    return took, net.state_of(x)


def test_a_leaving_member_tells_every_member_it_left_and_may_exit_at_once() -> None:
    # A stop waits for its leave to complete: a restarted gateway needs the ports.
    took, held = _leave(announce_fanout=32)
    assert CFG.leave_linger <= took <= CFG.leave_linger + 0.02 and held == {LEFT}, (took, held)
    took, held = _leave(announce_fanout=32, linger=0.0)  # a gateway's: it owns no ring slot
    assert took < 0.03 and held == {LEFT}, (took, held)  # two steps of the simulated network
    took, held = _leave(announce_fanout=0)  # the rumor rides retransmit_mult * log2(N) pings
    assert took > CFG.leave_linger + 4 * PERIOD, took
    # The last member has no one to tell: it leaves at the end of its linger, not the timeout.
    took, _ = _leave(announce_fanout=32, members=1, leaver="n000")
    assert CFG.leave_linger <= took <= CFG.leave_linger + 0.02, took
    # More members than the fanout: told to 32 at once, the rest hear it with the pings.
    took, held = _leave(announce_fanout=32, members=40)
    assert took > CFG.leave_linger + 4 * PERIOD and held == {LEFT}, (took, held)


def _rejoin_after_leave(announce_fanout: int) -> float:
    """A member leaves, its process exits, and a new one starts under the same name and
    address (a rolling restart): how long until every other member holds it alive."""
    config = replace(CFG, announce_fanout=announce_fanout)
    net = SimNet(10, seed=21, config=config)
    net.boot()
    x = "n005"
    net.send(x, net.nodes[x].leave(net.now))
    assert net.run(10.0, until=lambda: net.nodes[x].leave_complete) is not None
    net.crashed.add(x)
    assert net.run(5.0, until=lambda: net.state_of(x) == {LEFT}) is not None
    net.crashed.discard(x)
    took = _start_and_time_until_alive(net, x, config)
    assert net.nodes[x].incarnation > 0  # it refuted the `left` held under its name
    return took


def _start_and_time_until_alive(net: SimNet, x: str, config: SwimConfig) -> float:
    """Start a new process for member `x` (seeded with the first three members); return
    how long until every other member holds it alive."""
    seeds = [net.addr[n] for n in net.names[:3]]
    net.nodes[x] = Swim(
        x, net.addr[x], meta={"role": "node"}, seeds=seeds, config=config, rng=random.Random(x), now=net.now
    )
    net.start(x)
    took = net.run(10.0, until=lambda: net.state_of(x) == {ALIVE}, check_every=0.0)
    assert took is not None
    return took


def test_a_restarted_member_is_alive_everywhere_within_a_round_trip() -> None:
    # Its join finds it held as left; the refutation goes straight to every member. By the
    # pings alone it would take a protocol period or more, while the restarted member counts
    # itself in the ring and the others do not (actors bounced between two owners).
    assert _rejoin_after_leave(announce_fanout=32) <= 0.04  # two steps of the simulated network
    assert _rejoin_after_leave(announce_fanout=0) > PERIOD


def _join_new_member(announce_fanout: int) -> float:
    """A member never seen before joins a running cluster through 3 seeds (a scale-up):
    how long until every other member holds it alive."""
    config = replace(CFG, announce_fanout=announce_fanout)
    net = SimNet(10, seed=22, config=config)
    net.boot()
    x = "n010"
    net.names.append(x)
    net.addr[x] = ("10.0.0.1", 7010)
    net.by_addr[net.addr[x]] = x
    return _start_and_time_until_alive(net, x, config)


def test_a_new_member_is_alive_everywhere_within_a_round_trip() -> None:
    # Its join reaches the seeds; the others hear of it from its announcement, not a
    # protocol period or more later with the pings.
    assert _join_new_member(announce_fanout=32) <= 0.04
    assert _join_new_member(announce_fanout=0) > 0.1  # 0.22 s with this seed


def _announced_to(outs: list[Outgoing], me: Member) -> list[str]:
    pings = [o.message for o in outs if isinstance(o.message, Ping)]
    assert all(p.rumors == (Rumor(me, me.name),) for p in pings)
    return sorted(p.target for p in pings)


def test_a_member_announces_its_join_and_its_return_but_not_a_refuted_suspicion() -> None:
    swim = Swim("me", ("h", 0), meta={}, seeds=[("h", 1)], config=CFG, rng=random.Random(1), now=0.0)
    swim.start(0.0)
    peers = tuple(Member(n, ("h", i + 1), 0, ALIVE, {}) for i, n in enumerate("abcd"))
    # The answer to its join lists the members: each hears of it at once, once.
    outs = swim.receive(0.0, ("h", 1), PushPull("a", ("h", 1), peers, reply=True))
    assert _announced_to(outs, swim.members["me"]) == list("abcd")
    outs = swim.receive(1.0, ("h", 2), PushPull("b", ("h", 2), peers, reply=True))
    assert _announced_to(outs, swim.members["me"]) == []
    # A refuted suspicion changes no ring: it rides the pings (under loss members refute
    # often, and 32 pings each time would add most of the traffic).
    suspected = Rumor(Member("me", ("h", 0), 0, SUSPECT, {}), "a")
    outs = swim.receive(1.1, ("h", 1), Ack(99, "a", (suspected,)))
    assert swim.incarnation == 1 and _announced_to(outs, swim.members["me"]) == []
    # Held as left (restarted under this name) or faulty (paused): every member hears the
    # refutation at once, whatever message brought the news.
    for state, incarnation in ((LEFT, 5), (FAULTY, 8)):
        dead = Rumor(Member("me", ("h", 0), incarnation, state, {}), "b")
        outs = swim.receive(1.2, ("h", 2), Ack(98, "b", (dead,)))
        assert swim.incarnation == incarnation + 1
        assert _announced_to(outs, swim.members["me"]) == list("abcd")
    # A leaving member announces nothing.
    swim.leave(1.3)
    dead = Rumor(Member("me", ("h", 0), 20, FAULTY, {}), "c")
    assert _announced_to(swim.receive(1.4, ("h", 3), Ack(97, "c", (dead,))), swim.members["me"]) == []


def test_paused_member_learns_it_was_dropped_and_rejoins() -> None:
    net = SimNet(10, seed=13, loss=0.02)
    net.boot()
    x = "n007"
    before = net.nodes[x].incarnation
    net.paused.add(x)
    took = net.run(3 * CFG.suspicion_max, until=lambda: net.state_of(x) == {FAULTY})
    assert took is not None
    net.run(2.0)  # stay paused a little longer: its own timers run out too
    net.paused.clear()
    back = net.run(10.0, until=lambda: net.state_of(x) == {ALIVE} and net.converged(10))
    assert back is not None
    self_faulty = [ev for _, o, ev in net.log if o == x and ev.member.name == x and ev.member.state is FAULTY]
    assert len(self_faulty) == 1
    assert net.nodes[x].rejoined_count == 1
    assert net.nodes[x].incarnation > before
    # While cut off it heard nobody, so it must not have declared anyone else dead.
    assert [e for e in net.faulty_events() if e[2].member.name != x] == []


def test_fast_evidence_probe_speeds_detection() -> None:
    net = SimNet(6, seed=21)
    net.boot()
    victim = "n002"
    net.crashed.add(victim)
    for name in net.live():
        net.send(name, net.nodes[name].probe_now(victim, net.now))
    took = net.run(5.0, until=lambda: net.state_of(victim) == {FAULTY}, check_every=0.02)
    assert took is not None and took < CFG.suspicion_min + 3 * PERIOD


# -- next_deadline: what the asyncio adapter sleeps until ---------------------------------


def test_a_tick_before_next_deadline_sends_nothing_and_changes_no_member() -> None:
    net = SimNet(10, seed=17, loss=0.05)
    net.boot()
    net.crashed.add("n004")  # probes fail: ping-reqs, relays, suspicions, a FAULTY
    checked = 0

    def check(name: str) -> None:
        nonlocal checked
        node = net.nodes[name]
        if net.now < node.next_deadline():
            clone = copy.deepcopy(node)
            clone.take_events()  # what receive() produced since the last tick
            probes, health = set(clone._probes), clone.local_health
            assert clone.tick(net.now) == [], name
            assert clone.take_events() == [], name
            assert (set(clone._probes), clone.local_health) == (probes, health), name
            checked += 1

    net.before_tick = check
    assert net.run(8.0, until=lambda: net.state_of("n004") == {FAULTY}) is not None
    net.send("n006", net.nodes["n006"].leave(net.now))  # and a leave, with its linger timer
    net.run(5.0)
    assert net.state_of("n006") == {LEFT}
    assert checked > 1000


def test_ticking_only_at_deadlines_detects_as_fast_and_stays_quiet() -> None:
    took = {}
    for deadline_ticks in (False, True):
        net = SimNet(30, seed=23, loss=0.03, deadline_ticks=deadline_ticks)
        net.boot()
        net.run(60.0)
        assert net.faulty_events() == [], deadline_ticks
        net.crashed.add("n017")
        took[deadline_ticks] = net.run(
            40 * PERIOD, until=lambda net=net: net.state_of("n017") == {FAULTY}, check_every=0.02
        )
    assert took[True] is not None and took[False] is not None
    assert took[True] <= took[False] + 3 * PERIOD, took
