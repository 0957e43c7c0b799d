"""A Ringside node: the composition root that wires runtime, persister, links and admin.

Start order: Redis client, write-behind, runtime, link server, admin server,
flush and passivation loops. Stop order (SIGTERM/SIGINT): stop taking links,
flush every dirty actor, then close Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from websockets.asyncio.server import serve

from server.admin import AdminRefused, admin_routes
from server.config import ClusterConfig, run_marker
from server.errors import (
    ActorMoved,
    BadRequest,
    Overloaded,
    RingsideError,
    Unavailable,
    error_reply,
    ok_reply,
)
from server.game import GameState
from server.gcpolicy import GcPolicy
from server.hotmetrics import LabelledCounts
from server.link import Link, serve_unix_links
from server.membership import Membership
from server.messaging import GAME_OPS, Messaging
from server.migration import Migrator
from server.peers import Peers
from server.persister import Persister
from server.player import PlayerState, Request, parse_request
from server.ring import HashRing
from server.runtime import Activation, ActorRuntime
from server.store import Store, StoreUnavailable
from server.swim import DEAD, MemberState
from server.wire import Frame, Kind
from server.writebehind import WriteBehind

log = logging.getLogger("ringside.node")

MUTATING_OPS = frozenset({"player.update"})
PING_RESULT = {"pong": True}


@dataclass(slots=True)
class NodeSession:
    id: int
    actor: str  # "player:<id>"
    link: Link
    last_seq: int = 0


class NodeMetrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Counted per request: plain numbers, exported at scrape time (server/hotmetrics.py).
        self.requests = LabelledCounts("ringside_node_requests", "Client requests handled", ["op", "result"])
        r.register(self.requests)
        self.flush_seconds = Histogram(
            "ringside_node_flush_seconds", "Duration of one pipelined flush", registry=r
        )
        gauges: dict[str, tuple[str, Any]] = {
            "ringside_node_actors": ("Active actors", lambda: len(node.runtime)),
            "ringside_node_sessions": ("Attached sessions", lambda: len(node.sessions)),
            "ringside_node_dirty_actors": ("Actors waiting for a flush", lambda: len(node.wb)),
            "ringside_node_flush_lag_seconds": (
                "Seconds since the last successful flush while dirty",
                node.flush_lag,
            ),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

        # Observability (issue 8): read at scrape time from counters the parts already
        # keep, so nothing here costs the hot path. Labels are bounded (states, kinds).
        from collections.abc import Iterator

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        def collect() -> Iterator[Metric]:
            swim = node.membership.endpoint.swim
            members = GaugeMetricFamily("ringside_node_members", "Gossip members by state", labels=["state"])
            by_state = dict.fromkeys(("alive", "suspect", "faulty", "leaving", "left"), 0)
            for member in swim.members.values():
                by_state[member.state.value] = by_state.get(member.state.value, 0) + 1
            for state, count in by_state.items():
                members.add_metric([state], count)
            yield members
            kinds = GaugeMetricFamily(
                "ringside_node_actors_by_kind", "Active actors by kind", labels=["kind"]
            )
            games = sum(1 for key in node.runtime.actors if key.startswith("game:"))
            kinds.add_metric(["player"], len(node.runtime) - games)
            kinds.add_metric(["game"], games)
            yield kinds
            links = [*node.links, *node.peers.links.values()]
            link_bytes = CounterMetricFamily(
                "ringside_node_link_bytes", "Bytes on open gateway and peer links", labels=["direction"]
            )
            link_bytes.add_metric(["in"], sum(link.bytes_in for link in links))
            link_bytes.add_metric(["out"], sum(link.bytes_out for link in links))
            yield link_bytes
            counters = {
                "ringside_node_activations": ("Activations", node.runtime.activations_total),
                "ringside_node_passivations": ("Passivations", node.runtime.passivations_total),
                "ringside_node_stale_epoch": ("Writes refused for a stale epoch", node.runtime.stale_total),
                "ringside_node_redis_errors": ("Failed flushes", node.persister.redis_errors_total),
                "ringside_node_flush_bugs": (
                    "Flush errors that were not a Redis outage (a bug: see the log)",
                    node.persister.loop_errors_total,
                ),
                "ringside_node_states_written": ("Actor states written", node.persister.states_written_total),
                "ringside_node_handoffs": ("Actors handed off (ring change, drain)", node.handoffs_total),
                "ringside_node_migrated": ("Actors migrated to another node", node.migrator.migrated_total),
                "ringside_node_adopted": ("Actors adopted from another node", node.runtime.adopted_total),
                "ringside_node_flushes": ("Pipelined flushes", node.persister.flushes_total),
                "ringside_node_forwarded": ("Messages forwarded to owners", node.messaging.forwarded_total),
                "ringside_node_gap_fills": ("Push gaps filled", node.messaging.gaps_filled_total),
                "ringside_node_peer_calls": ("Actor calls to other nodes", node.peers.calls_total),
                "ringside_node_peer_sends": ("One-way actor messages to other nodes", node.peers.sends_total),
                "ringside_node_self_faulty_drops": (
                    "Times this node dropped its activations after being declared faulty",
                    node.self_faulty_drops,
                ),
                "ringside_node_gossip_dropped": ("Gossip packets dropped", node.membership.endpoint.dropped),
            }
            for name, (doc, value) in counters.items():
                yield CounterMetricFamily(name, doc, value=value)
            draining = int(node.draining_since is not None)
            yield GaugeMetricFamily("ringside_node_draining", "1 while the node drains", value=draining)

        class ScrapeTime:  # a registry wants a hashable object with collect()
            def collect(self) -> Iterator[Metric]:
                return collect()

        r.register(ScrapeTime())


class Node:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.address = config.node_address(name)
        settings = config.node
        self.store = Store(config.redis.effective_url, max_connections=settings.redis_max_connections)
        self.wb = WriteBehind(
            interval=settings.flush_interval_ms / 1000,
            batch_max=settings.flush_batch_max,
            max_dirty=settings.max_dirty,
            retry_base=settings.retry_base_ms / 1000,
            retry_cap=settings.retry_cap_ms / 1000,
            rng=random.Random(),
            now=time.monotonic(),
        )
        self.runtime = ActorRuntime(
            self.store,
            self.wb,
            settings,
            clock=time.monotonic,
            load=self._load_actor,
            on_activated=lambda act: self.messaging.on_activated(act),
            on_deactivated=self._on_deactivated,
            handover_source=self._handover_source,
            pull=lambda source, key: self.migrator.pull(source, key),
        )
        self.persister = Persister(
            self.store, self.wb, self.runtime, clock=time.monotonic, on_durable=self._report_durable
        )
        self.sessions: dict[int, NodeSession] = {}
        self.sessions_by_actor: dict[str, set[int]] = {}
        self.links: set[Link] = set()
        self.membership = Membership(
            config,
            name=name,
            host=self.address.host,
            port=self.address.gossip_port,
            meta={
                "role": "node",
                "link": [self.address.host, self.address.link_port],
                "admin": [self.address.host, self.address.admin_port],
            },
            on_self_faulty=self._on_self_faulty,
            on_ring_change=self._on_ring_change,
        )
        self.peers = Peers(
            address_of=self.membership.link_address,
            auth_key=config.link_key,
            keyring=config.link_keyring,
            max_frame=settings.max_link_frame_bytes,
            write_buffer=settings.link_write_buffer_bytes,
            unix_links=settings.unix_links,
        )
        self.migrator = Migrator(
            name=name,
            settings=settings,
            runtime=self.runtime,
            store=self.store,
            write_behind=self.wb,
            peers=self.peers,
            link_address=(self.address.host, self.address.link_port),
        )
        self.messaging = Messaging(
            name=name,
            settings=settings,
            membership=self.membership,
            peers=self.peers,
            runtime=self.runtime,
            write_behind=self.wb,
            persister=self.persister,
            migrator=self.migrator,
            push=self._push,
            game_id_key=config.game_id_key,
        )
        self._link_keyring = config.link_keyring
        self.started_at = time.time()
        self.self_faulty_drops = 0
        self.draining_since: float | None = None
        self._draining_elsewhere: set[str] = set()  # serving in gossip, claimed a drain in Redis
        # For migration_pull_s after a ring change: the ring before the change (or the
        # first of a run of them) and who else held keys then, to pull what it gave us.
        self._pull_until = time.monotonic() + settings.migration_pull_s
        self._pull_ring: HashRing | None = None
        self._base_ring: HashRing | None = None
        self._ring_members: tuple[str, ...] = ()
        self.handoffs_total = 0
        self.link_auth_failures = 0  # links cut for a wrong proof or a frame that did not open
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = NodeMetrics(self)
        self.gc = GcPolicy(config.gc)
        self.metrics.registry.register(self.gc)
        self.persister.on_flushed = self.metrics.flush_seconds.observe
        self._stopping = asyncio.Event()

    # -- link frames ------------------------------------------------------
    def _new_link(self) -> Link:
        link = Link(
            self._on_frames,
            self._on_link_lost,
            max_frame=self.config.node.max_link_frame_bytes,
            write_buffer=self.config.node.link_write_buffer_bytes,
            auth_key=self.config.link_key,
            accepting=True,
            keyring=self._link_keyring,
        )
        self.links.add(link)
        return link

    def _on_link_lost(self, link: Link) -> None:
        self.links.discard(link)
        self.link_auth_failures += link.auth_failures
        for session in [s for s in self.sessions.values() if s.link is link]:
            self._detach(session.id)

    def _on_frames(self, link: Link, frames: list[Frame]) -> None:
        for frame in frames:
            kind = frame.kind
            try:
                if kind is Kind.REQUEST:
                    self._on_request(link, frame)
                elif kind is Kind.ATTACH:
                    self._on_attach(link, frame)
                elif kind is Kind.ACTOR_CALL or kind is Kind.ACTOR_SEND:
                    self.messaging.on_peer_frame(link, frame)
                elif kind is Kind.DETACH:
                    self._detach(frame.session)
                elif kind is Kind.FILL:
                    self._on_fill(frame)
                else:
                    log.warning("unexpected frame from gateway", extra={"kind": kind.name})
            except Exception:
                # A bug must cost one request, not the link (a replay would hit it again).
                log.exception("frame handler failed", extra={"kind": kind.name})
                error = RingsideError("internal error")
                if kind is Kind.REQUEST:
                    link.send(Kind.REPLY, frame.session, frame.seq, 0, error_reply(None, error))
                elif kind is Kind.ACTOR_CALL:
                    link.send(Kind.ACTOR_REPLY, 0, frame.seq, 0, error_reply(None, error))

    def _on_attach(self, link: Link, frame: Frame) -> None:
        player = frame.payload.decode(errors="replace")
        actor = f"player:{player}"
        if self.migrator.moved and (moved_to := self.migrator.redirect(actor)) is not None:
            link.send(Kind.MOVED, frame.session, payload=moved_to.encode())
            return
        old = self.sessions.get(frame.session)
        if old is not None and old.actor != actor:
            self._detach(frame.session)
        session = NodeSession(frame.session, actor, link)
        self.sessions[frame.session] = session

        def attached(act: Activation) -> None:
            if self.sessions.get(session.id) is not session:
                return  # detached (or attached anew) while the actor activated
            # Joined to the actor only now, so fencing off an older activation
            # during the attach does not report this session lost.
            self.sessions_by_actor.setdefault(actor, set()).add(session.id)
            link.send(Kind.ATTACHED, session.id, act.player.applied_seq, act.flushed_seq)

        def failed(error: RingsideError) -> None:
            if self.sessions.get(session.id) is not session:
                return  # detached (or attached anew) meanwhile: not this attach's business
            self._detach(session.id)
            if isinstance(error, ActorMoved) and error.node:
                link.send(Kind.MOVED, session.id, payload=error.node.encode())
            else:
                link.send(Kind.ERROR, session.id, payload=error_reply(None, error))

        try:
            self.runtime.attach(actor, attached, failed)
        except RingsideError as exc:
            failed(exc)

    def _on_fill(self, frame: Frame) -> None:
        session = self.sessions.get(frame.session)
        if session is not None:
            fill = self.messaging.fill_work(stream=frame.aux, after=frame.seq)
            with contextlib.suppress(Overloaded):  # the gateway asks again while the gap persists
                self.runtime.deliver(session.actor, fill, lambda error: None)

    def _detach(self, session_id: int) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            peers = self.sessions_by_actor.get(session.actor)
            if peers is not None:
                peers.discard(session_id)
                if not peers:
                    del self.sessions_by_actor[session.actor]

    def _on_request(self, link: Link, frame: Frame) -> None:
        session = self.sessions.get(frame.session)
        if session is None or session.link is not link:
            link.send(Kind.SESSION_LOST, frame.session, frame.seq)
            return
        seq = frame.seq
        payload = frame.payload
        act = self.runtime.ready(session.actor)
        if act is not None:  # the usual case: the actor is here and idle
            self.runtime.end_turn(act, self._serve(link, session, act, seq, payload))
            return

        def work(act: Activation) -> Any:
            return self._serve(link, session, act, seq, payload)

        def failed(error: RingsideError) -> None:
            if isinstance(error, ActorMoved):
                # Not the client's business: the session re-attaches and replays this.
                if error.node:
                    link.send(Kind.MOVED, session.id, payload=error.node.encode())
                else:
                    link.send(Kind.SESSION_LOST, session.id, seq)
                return
            request_id = None
            try:
                request_id = parse_request(payload).id
            except RingsideError as exc:
                request_id = exc.request_id
            link.send(Kind.REPLY, session.id, seq, 0, error_reply(request_id, error))

        try:
            self.runtime.deliver(session.actor, work, failed)
        except RingsideError as exc:
            failed(exc)

    def _serve(
        self, link: Link, session: NodeSession, act: Activation, seq: int, payload: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """One client request, in the actor's turn; a game request returns what to await.
        Every RingsideError becomes the client's reply in here: the fast path in
        `_on_request` has no `failed` to hand one to."""
        session.last_seq = seq
        try:
            request = parse_request(payload)
        except RingsideError as exc:
            link.send(Kind.REPLY, session.id, seq, self._durable(act, seq), error_reply(exc.request_id, exc))
            return None
        if request.op in GAME_OPS:
            return self._game_request(link, session, act, seq, request)
        link.send(Kind.REPLY, session.id, seq, *self._handle(act, seq, request))
        return None

    def _durable(self, act: Activation, seq: int) -> int:
        return act.flushed_seq if self.wb.is_dirty(act.key) else seq

    def _handle(self, act: Activation, seq: int, request: Request) -> tuple[int, bytes]:
        """Run one player request in the actor's turn; return (durable seq, reply bytes)."""
        key = act.key
        player = act.player
        op = request.op
        try:
            if op == "ping":
                if request.args:
                    raise BadRequest("ping takes no args")
                result: Any = PING_RESULT
            elif op in MUTATING_OPS and seq <= player.applied_seq:
                result = player.view()  # a replayed request this actor already applied
            else:
                if op in MUTATING_OPS and not self.wb.can_accept(key):
                    raise Unavailable("state store unreachable and write buffer full; retry later")
                result, mutated = player.handle(op, request.args, self.config.node, seq=seq)
                if mutated:
                    self.wb.mark_dirty(key)
            reply = ok_reply(request.id, result)
            self.metrics.requests.add((op, "ok"))
        except RingsideError as exc:
            reply = error_reply(request.id, exc)
            self.metrics.requests.add((_op_label(op), exc.code))
        return self._durable(act, seq), reply

    async def _game_request(
        self, link: Link, session: NodeSession, act: Activation, seq: int, request: Request
    ) -> None:
        try:
            result = await self.messaging.game_request(act, seq, request)
            reply = ok_reply(request.id, result)
            self.metrics.requests.add((request.op, "ok"))
        except RingsideError as exc:
            reply = error_reply(request.id, exc)
            self.metrics.requests.add((_op_label(request.op), exc.code))
        link.send(Kind.REPLY, session.id, seq, self._durable(act, seq), reply)

    def _push(self, actor: str, seq: int, stream: int, payload: bytes) -> None:
        for session_id in self.sessions_by_actor.get(actor, ()):
            session = self.sessions[session_id]
            session.link.send(Kind.PUSH, session_id, seq, stream, payload)

    def _load_actor(self, key: str, blob: bytes | None) -> Any:
        kind, _, ident = key.partition(":")
        if kind == "game":
            return GameState.from_blob(blob, ident, self.config.node.game_log_size)
        return PlayerState.from_blob(blob, default_name=ident)

    def _report_durable(self, act: Activation) -> None:
        if self.runtime.actors.get(act.key) is not act:
            return
        clean = not self.wb.is_dirty(act.key)
        for session_id in self.sessions_by_actor.get(act.key, ()):
            session = self.sessions[session_id]
            durable = max(session.last_seq, act.flushed_seq) if clean else act.flushed_seq
            session.link.send(Kind.DURABLE, session_id, durable)

    def _on_deactivated(self, act: Activation, stale: bool, moved_to: str | None) -> None:
        self.migrator.forget(act.key)
        if moved_to is not None:
            for session_id in list(self.sessions_by_actor.get(act.key, ())):
                session = self.sessions[session_id]
                session.link.send(Kind.MOVED, session_id, payload=moved_to.encode())
                self._detach(session_id)
            return
        if not stale:
            return
        # Our activation lost its epoch: the sessions must re-attach (to a fresh
        # activation) and replay what was not durable.
        for session_id in list(self.sessions_by_actor.get(act.key, ())):
            session = self.sessions[session_id]
            session.link.send(Kind.SESSION_LOST, session_id)
            self._detach(session_id)

    def _on_self_faulty(self) -> None:
        # The cluster gave our actors to other nodes (we were paused or cut off): our
        # copies may be stale. Drop them unwritten; the gateway replays what was not durable.
        self.self_faulty_drops += 1
        dropped = len(self.runtime)
        self.runtime.drop_all()
        log.warning("dropped all activations", extra={"actors": dropped})

    # -- ring changes, drain ------------------------------------------------
    def _handover_source(self, key: str) -> str | None:
        """The ring just gave us `key` (we joined, or its owner is leaving): the node that
        owned it before may hold it live. Not one declared faulty or gone: no answer."""
        if self._pull_ring is None or time.monotonic() > self._pull_until or self.draining_since:
            return None
        if self.membership.ring.owner(key) != self.name:
            return None
        if self._base_ring is not None and self._base_ring.owner(key) == self.name:
            return None  # ours before the change too
        source = self._pull_ring.owner(key)
        member = self.membership.member(source)
        if member is None or member.state in DEAD:
            return None
        return source

    def _on_ring_change(self, ring: HashRing) -> None:
        now = time.monotonic()
        if now > self._pull_until:
            # A new run of changes: what we owned before it is not to be pulled. (In the
            # window after our start the base stays None: we owned nothing before.)
            alone = self._ring_members in ((), (self.name,))
            self._base_ring = None if alone else HashRing(self._ring_members)
        # Who held a key before, as far as we can tell: the members of the last ring and
        # this one, without us.
        before = set(self._ring_members) | set(ring.members)
        before.discard(self.name)
        for gone in before - set(ring.members):
            member = self.membership.member(gone)
            if member is not None and member.state is MemberState.FAULTY:
                self.peers.forget(gone)  # calls to it go to the new owners now, not on waiting
        self._ring_members = ring.members
        live = self.config.node.handoff == "live" and before and self.name in ring.members
        self._pull_ring = HashRing(sorted(before)) if live else None
        self._pull_until = now + self.config.node.migration_pull_s
        draining = self.draining_since is not None
        self.migrator.on_ring_change(ring.members, None if draining or not ring.members else ring.owner)
        if ring.members and not draining:
            adopted = self.migrator.is_adopted  # ours until its sender leaves the ring
            self._spawn(self._hand_off(lambda key: ring.owner(key) != self.name and not adopted(key), ring))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _by_sessions_first(self, keys: list[str]) -> list[str]:
        """Actors with sessions first: theirs are the pauses players see."""
        return sorted(keys, key=lambda k: k not in self.sessions_by_actor)

    async def _hand_off(self, moving: Callable[[str], bool], ring: HashRing, timeout: float = 5.0) -> int:
        """Hand the actors that now belong elsewhere to their new owners: node to node
        (live), or by writing them at once so their new owners load fresh state."""
        keys = [key for key in self.runtime.actors if moving(key)]
        if not keys:
            return 0
        started = time.monotonic()
        migrated = 0
        if self.config.node.handoff == "live":
            deadline = started + self.config.node.migration_timeout_s
            migrated = await self.migrator.migrate(self._by_sessions_first(keys), ring.owner, deadline)
            keys = [key for key in keys if key in self.runtime.actors and moving(key)]
        for key in keys:
            if self.wb.is_dirty(key):
                self.wb.mark_dirty(key, urgent=True)
        self.persister.kick()
        deadline = time.monotonic() + timeout
        while any(self.wb.is_dirty(k) for k in keys) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        released: list[tuple[str, int, bool]] = []
        for i, key in enumerate(keys):
            if i % 256 == 255:
                await asyncio.sleep(0)  # thousands of actors: keep serving meanwhile
            act = self.runtime.actors.get(key)
            if act is None or key in self.sessions_by_actor or not moving(key):
                continue
            epoch, timed = act.epoch, act.timer is not None
            if self.runtime.passivate(key):
                released.append((key, epoch, timed))
        self.messaging.tell_released(released)
        handed = len(released)
        self.handoffs_total += handed + migrated
        log.info(
            "handed off actors",
            extra={
                "migrated": migrated,
                "via_redis": handed,
                "moving": len(keys) + migrated,
                "elapsed_s": round(time.monotonic() - started, 3),
            },
        )
        return handed + migrated

    async def _admin_drain(self, *, force: bool = False) -> dict[str, Any]:
        if self.draining_since is not None:
            return self.status()
        others = [n for n in self.membership.serving_nodes() if n != self.name]
        last = (
            f"{self.name} is the last node serving (others are down or draining): drained, "
            "no node would serve and clients wait until one starts; ?force=1 drains it anyway"
        )
        if not others and not force:
            raise AdminRefused(last)
        # Gossip takes a round to tell the others that a node drains; the claim in Redis does
        # not, so of two drains at once on the last two serving nodes one is refused.
        ttl_s = self.config.node.drain_timeout_s + 10
        try:
            claimed, serving = await asyncio.wait_for(
                self.store.claim_drain(self.name, others, ttl_s=ttl_s, force=force), 3
            )
        except (StoreUnavailable, TimeoutError) as exc:
            if not force:
                raise AdminRefused(
                    f"Redis did not answer ({exc or 'timeout'}): a drain now could not write what "
                    f"{self.name} holds; ?force=1 drains it anyway"
                ) from exc
            serving = others
        else:
            if not claimed:
                raise AdminRefused(last)
        if self.draining_since is None:  # not started by a request answered meanwhile
            self.draining_since = time.monotonic()
            self._draining_elsewhere = set(others) - set(serving)
            self.membership.announce_draining()
            self._spawn(self._drain())
        return self.status()

    async def _drain(self) -> None:
        started = time.monotonic()
        settings = self.config.node
        deadline = started + settings.drain_timeout_s
        log.info("drain started", extra={"actors": len(self.runtime), "sessions": len(self.sessions)})
        # 1. Everything in Redis while we still own it, so new owners load fresh state.
        await self.persister.flush_all(deadline=min(deadline, started + 10))
        # 2. Live migration, actors with sessions first: their state and a fresh epoch go
        #    to their owners in the ring without us; the sessions follow (MOVED) before we
        #    even leave. Then leave the ring (peers, the gateway first of all, route to the
        #    new owners; we redirect what still comes) while the idle actors follow.
        # Not to a node that drains too: its actors would move twice.
        others = [
            n for n in self.membership.serving_nodes() if n != self.name and n not in self._draining_elsewhere
        ]
        live = settings.handoff == "live" and bool(others)
        target = HashRing(others) if live else None
        migration_deadline = min(deadline, time.monotonic() + settings.migration_timeout_s)
        migrated = 0
        if target is not None:
            hot = [key for key in self.runtime.actors if key in self.sessions_by_actor]
            migrated += await self.migrator.migrate(hot, target.owner, migration_deadline)
            log.info(
                "migrated the actors with sessions",
                extra={"migrated": migrated, "elapsed_s": round(time.monotonic() - started, 3)},
            )
        leaving = asyncio.get_running_loop().create_task(self.membership.leave(settings.leave_timeout_s))
        if target is not None:
            idle = list(self.runtime.actors)
            migrated += await self.migrator.migrate(idle, target.owner, migration_deadline)
            log.info(
                "migrated actors",
                extra={
                    "migrated": migrated,
                    "left": len(self.runtime),
                    "elapsed_s": round(time.monotonic() - started, 3),
                },
            )
        # 3. What did not migrate (handoff "redis", or busy past the deadline) goes the Redis
        #    way: the gateway re-pins its sessions and we write at once what they changed
        #    meanwhile; its new owner loads it on first use.
        last_report = 0.0
        while time.monotonic() < deadline:
            if not self.sessions and not len(self.wb):
                break
            self.wb.hurry()
            self.persister.kick()
            if time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                log.info("draining", extra={"actors": len(self.runtime), "sessions": len(self.sessions)})
            await asyncio.sleep(0.01)
        flushed = await self.persister.flush_all(deadline=time.monotonic() + 5)
        await leaving
        handed = len(self.runtime)
        unflushed = len(self.wb)  # past the deadline with Redis away: the gateway replays them
        self.messaging.tell_released(
            [(key, act.epoch, act.timer is not None) for key, act in self.runtime.actors.items()]
        )
        await self.messaging.settle(timeout=1.0)
        self.runtime.drop_all()
        self.handoffs_total += handed + migrated
        log.info(
            "drain finished",
            extra={
                "elapsed_s": round(time.monotonic() - started, 3),
                "migrated": migrated,
                "handed_off": handed,
                "left_actors": unflushed,
                "left_sessions": len(self.sessions),
                "flushed": flushed,
            },
        )
        # Tells `ringside status` this node was drained on purpose, not lost; the local
        # cluster removes it when the node starts again.
        self._write_marker("drained")
        self._stopping.set()

    def _write_marker(self, kind: str, text: str = "") -> None:
        path = run_marker(self.config.run_dir, self.name, kind)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            log.warning("could not write the run marker", extra={"path": str(path), "error": str(exc)})

    async def _stall_watchdog(self) -> None:
        """SWIM may tell a resumed node only of a suspicion it then refutes, never that it
        was declared faulty; our own clock tells us we were gone long enough for that."""
        period = 0.1
        limit = self.config.node.stall_drop_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - last - period > limit:
                log.warning("process was stalled", extra={"stalled_s": round(now - last - period, 2)})
                self._on_self_faulty()
            last = now

    # -- admin ------------------------------------------------------------
    def flush_lag(self) -> float:
        return 0.0 if not len(self.wb) else max(0.0, time.monotonic() - self.persister.last_success)

    def health(self) -> tuple[bool, str]:
        if self.wb.degraded:
            return False, f"degraded: Redis writes failing, {len(self.wb)} actors waiting"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "node",
            "state": "serving" if self.draining_since is None else "draining",
            "drain_elapsed_s": (
                None if self.draining_since is None else round(time.monotonic() - self.draining_since, 3)
            ),
            "handoffs": self.handoffs_total,
            "migrated": self.migrator.migrated_total,
            "adopted": self.runtime.adopted_total,
            "link_auth_failures": self.link_auth_failures,
            "uptime_s": round(time.time() - self.started_at, 1),
            "actors": len(self.runtime),
            "sessions": len(self.sessions),
            "links": len(self.links),
            "peer_links": {node: link.via for node, link in self.peers.links.items()},
            "dirty": len(self.wb),
            "degraded": self.wb.degraded,
            "flush_lag_s": round(self.flush_lag(), 3),
            "flushes": self.persister.flushes_total,
            "states_written": self.persister.states_written_total,
            "stale_epoch_refusals": self.runtime.stale_total,
            "redis_errors": self.persister.redis_errors_total,
            "flush_bugs": self.persister.loop_errors_total,
            "dropped_all_activations": self.self_faulty_drops,
            "membership": self.membership.status(),
            "gc": self.gc.status(),
        }

    # -- lifecycle --------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:  # serving again after a drain: that drain's claim must not hold back others'
            await asyncio.wait_for(self.store.clear_drain_claim(self.name), 2)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("could not clear an earlier drain claim", extra={"error": str(exc) or "timeout"})
        link_server = await loop.create_server(
            self._new_link, self.address.host, self.address.link_port, reuse_address=True
        )
        unix_link_server = None
        if self.config.node.unix_links:
            address = self.address
            unix_link_server = await serve_unix_links(self._new_link, address.host, address.link_port)
        routes = admin_routes(
            status=self.status,
            health=self.health,
            registry=self.metrics.registry,
            actions={
                "drain": lambda query: self._admin_drain(force=query.get("force") in ("1", "true", "yes")),
                "gc": lambda query: self.gc.reclaim(census=True),
            },
            admin_token=self.config.admin_token,
        )
        admin = await serve(_no_websocket, self.address.host, self.address.admin_port, process_request=routes)
        await self.membership.start()
        background = [
            loop.create_task(self.persister.run()),
            loop.create_task(self._passivation_loop()),
            loop.create_task(self._stall_watchdog()),
            loop.create_task(self.gc.run()),
        ]
        self.gc.start()
        log.info(
            "node started",
            extra={"link_port": self.address.link_port, "admin_port": self.address.admin_port},
        )
        await self._stopping.wait()
        log.info("node stopping", extra={"dirty": len(self.wb), "actors": len(self.runtime)})
        link_server.close()
        if unix_link_server is not None:
            unix_link_server.close()
        for link in list(self.links):
            link.close()
        self.peers.close()
        for task in background:
            task.cancel()
        flushed = await self.persister.flush_all(
            deadline=time.monotonic() + self.config.node.stop_flush_timeout_s
        )
        left = await self.membership.leave(self.config.node.leave_timeout_s)
        log.info(
            "node stopped",
            # Peers drop us from the ring on `leaving`, at once; `left` takes ~2 s to spread
            # fully (every retransmission), which a stop does not wait for: false is normal.
            extra={"flushed": flushed, "left_dirty": len(self.wb), "left_fully_gossiped": left},
        )
        if not flushed:
            log.error(
                "stopped with acknowledged changes NOT written to Redis (unreachable); they are lost",
                extra={"actors": len(self.wb)},
            )
            self._write_marker("unflushed", f"{len(self.wb)}\n")  # `ringside down` reports it
        admin.close()
        await self.store.close()
        self.gc.close()

    async def _passivation_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.runtime.passivate_idle(time.monotonic())
            self.migrator.prune()


KNOWN_OPS = frozenset({"ping", "player.get", "player.update"}) | GAME_OPS


def _op_label(op: str) -> str:
    """Metrics label for an op: clients choose op strings, so unknown ones share one label."""
    return op if op in KNOWN_OPS else "other"


async def _no_websocket(connection: Any) -> None:
    await connection.close(1008, "admin port serves HTTP only")
