"""The gateway: client WebSockets in, one multiplexed link per node out.

Composition root: the ring, the node links, the client sessions and the admin
routes. After `hello` the gateway never parses a client's JSON: it stamps each
frame with the session's next sequence number, keeps it for replay, and sends
its bytes to the owner node; the node's reply bytes go back to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import random
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.typing import Origin

from gateway.dashboard import FEED_PATH, Dashboard, LinkBytes, MemberStates, count_member_events
from gateway.framing import ClientFrames
from gateway.ratelimit import TokenBucket
from gateway.session import PushVerdict, Session, SessionState
from server.admin import admin_routes
from server.config import ClusterConfig
from server.errors import CloseCode
from server.gcpolicy import GcPolicy
from server.hotmetrics import Count, LatencyHistogram
from server.link import Link, dial_link
from server.membership import Membership
from server.ring import HashRing
from server.store import Store, StoreUnavailable
from server.tokens import TokenError, verify
from server.wire import Frame, Kind

log = logging.getLogger("ringside.gateway")

FILL_RETRY_S = 0.25  # ask again if a gap persists this long
MAX_FILL_RETRIES = 40  # about 10 s of asking; then the client's game.events call is the way
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HelloRefused(Exception):
    def __init__(self, close: CloseCode, code: str, message: str) -> None:
        super().__init__(message)
        self.close = close
        self.code = code
        self.message = message


class ClientSession:
    """The asyncio side of one session: its socket and waiters.

    Idle sessions are most of a gateway's memory, so what only backpressure needs (the
    outbound queue, its writer task, the reader's wait for replay space) is made when
    backpressure happens and dropped when it is over."""

    __slots__ = (
        "core",
        "ws",
        "max_outbound",
        "outbound",
        "writer",
        "attached",
        "space",
        "close_code",
        "closing",
        "_on_close",
        "fills",
        "fill_sent_at",
        "probe_seq",
        "probe_at",
        "welcomed",
        "welcome_backlog",
        "detached_at",
        "fill_retries",
        "bucket",
    )

    def __init__(
        self,
        core: Session,
        ws: ServerConnection,
        max_outbound: int,
        on_close: Callable[[CloseCode], None],
        bucket: TokenBucket,
    ) -> None:
        self.core = core
        self.bucket = bucket  # the client's frame rate limit
        self.ws = ws
        self.max_outbound = max_outbound
        self.outbound: deque[bytes] | None = None  # frames waiting for the socket
        self.writer: asyncio.Task[None] | None = None  # drains `outbound`, then ends
        self.attached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.space: asyncio.Future[None] | None = None  # the reader waits for replay space
        self.close_code: CloseCode | None = None
        # finish(): the close to send once every request forwarded has its reply out, and
        # the timer that sends it anyway.
        self.closing: tuple[CloseCode, str, asyncio.TimerHandle] | None = None
        self._on_close = on_close
        self.welcomed = False  # frames before the welcome wait in `outbound`
        # Until what queued before the welcome has drained, `outbound` holds max_replay more
        # frames: after a take-over, the replies to every request the old socket had in
        # flight come to this one (see push).
        self.welcome_backlog = True
        # Set when the client's socket is gone (or taken over) while requests it was told
        # "ok" for are not durable yet: the session stays until they are (see _close_session).
        self.detached_at: float | None = None
        self.fills: dict[int, int] = {}  # stream -> seq a fill was asked from
        self.fill_sent_at = 0.0
        self.fill_retries = 0
        # One request in flight per session is timed (client-to-reply at the gateway):
        # a compare per reply instead of a timestamp per request.
        self.probe_seq = 0
        self.probe_at = 0.0

    def push(self, payload: bytes) -> None:
        ws = self.ws
        if self.detached_at is not None or ws.protocol.state is not State.OPEN:
            return  # the client will not read it
        if self.outbound is None and self.welcomed and not ws.paused:
            # Fast path: nothing queued and the socket takes data: frame it and write it
            # now, in this callback, instead of waking a writer task for each reply.
            protocol = ws.protocol
            if (
                type(ws) is GatewayConnection
                and not protocol.writes
                and not protocol.extensions
                and not protocol.expect_continuation_frame
            ):
                # A server's frames are unmasked and compression is off: a whole text
                # frame is a short header and the bytes, without websockets' framing.
                ws.transport.write(text_frame_header(len(payload)) + payload)
            else:
                protocol.send_text(payload)
                ws.send_data()
            return
        if self.outbound is None:
            self.outbound = deque()
        limit = self.max_outbound + self.core.max_replay if self.welcome_backlog else self.max_outbound
        if len(self.outbound) >= limit:
            self.close(CloseCode.TOO_SLOW, "outbound queue full: client is not reading")
            return
        self.outbound.append(payload)
        self.start_writer()

    def welcome_sent(self) -> None:
        """Frames may go to the client now: those queued before the welcome first."""
        self.welcomed = True
        if not self.outbound:
            self.welcome_backlog = False
        self.start_writer()

    def start_writer(self) -> None:
        if self.writer is None and self.welcomed and self.outbound and self.close_code is None:
            self.writer = asyncio.get_running_loop().create_task(self._write_queued())

    async def _write_queued(self) -> None:
        """Drains the frames that queued while the socket was paused (or before welcome)."""
        queue = self.outbound
        try:
            while queue:
                await self.ws.send(queue[0], text=True)  # waits while the socket is paused
                queue.popleft()
        except ConnectionClosed:
            pass
        finally:
            if self.outbound is queue and not queue:
                self.outbound = None
                self.welcome_backlog = False  # drained: the bound is max_outbound again
            self.writer = None
            break_error_cycles(self.ws)
            self.finish_if_answered()

    async def wait_for_space(self) -> None:
        """Backpressure: the replay buffer is full; stop reading this client until it is not."""
        self.space = asyncio.get_running_loop().create_future()
        try:
            await self.space
        finally:
            self.space = None

    def wake_reader(self) -> None:
        if self.space is not None and not self.space.done():
            self.space.set_result(None)

    def finish(self, code: CloseCode, reason: str, within: float) -> None:
        """Close with `code` once every request forwarded so far has had its reply written
        (at most `within` seconds from now); frames from here on are not forwarded. So the
        client knows what was applied: the requests it has a reply for, and no other."""
        if self.close_code is None and self.closing is None:
            timer = asyncio.get_running_loop().call_later(within, self.close, code, reason)
            self.closing = (code, reason, timer)
            self.finish_if_answered()

    def finish_if_answered(self) -> None:
        if self.closing is not None and self.core.unanswered == 0 and not self.outbound:
            self.close(*self.closing[:2])

    def close(self, code: CloseCode, reason: str) -> None:
        """Close with `code`. The close frame queues behind what the client has not read."""
        if self.closing is not None:
            self.closing[2].cancel()
        if self.close_code is None:
            self.close_code = code
            self.wake_reader()  # a reader waiting for replay space stops reading now
            self._on_close(code)
            if self.writer is not None:
                self.writer.cancel()
            asyncio.get_running_loop().create_task(self.ws.close(code, reason))


_SHORT_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]  # FIN + text, unmasked length


def text_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented, uncompressed text frame (RFC 6455 5.2)."""
    if length < 126:
        return _SHORT_TEXT_HEADERS[length]
    if length < 1 << 16:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


class Framing(enum.Enum):
    PENDING = "pending"  # not open yet: websockets reads the handshake
    OURS = "ours"  # whole frames are cut here (gateway/framing.py); text ones taken at once
    LIBRARY = "library"  # websockets reads every byte (closing, a frame past max_size, ...)


def break_error_cycles(connection: Any) -> None:
    """websockets keeps the errors that ended a connection (the parser's, the handshake's,
    the socket's), and each error's traceback holds frames that hold the connection: a
    reference cycle of 13-59 objects that only a full collection frees, and that the
    collector's policy (decision 28) would keep until its reclaim. Nothing reads those
    tracebacks later (they were logged, or are a ConnectionClosed's cause). Called when the
    socket is lost and again once the handler and the writer are done, since a write blocked
    at the time re-raises the socket's error afterwards."""
    protocol = getattr(connection, "protocol", None)
    errors = [
        getattr(protocol, "parser_exc", None),
        getattr(protocol, "handshake_exc", None),
        getattr(connection, "connection_exc", None),
    ]
    for error in errors:
        for _ in range(4):  # the error, then what caused it
            if error is None:
                break
            error.__traceback__ = None
            error = error.__cause__ or error.__context__


class GatewayConnection(ServerConnection):
    """websockets' server connection, plus a way around its frame parser and receive queue
    (decisions 22 and 27): while a session serves, a complete text frame goes straight to
    `on_message`, cut from the stream by `ClientFrames`, without websockets' parser and
    without waking the handler task (`recv()`) for each one. `on_message` returns False
    when it cannot take the frame now; then, and for anything else (control frames,
    fragments, binary), the frame takes websockets' own way and the handler reads it."""

    # Slots, not the instance dict: two more keys there double its table (websockets sets
    # ~20 attributes), +1.2 KiB per idle connection, measured.
    __slots__ = ("on_message", "framing", "frames")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_message: Callable[[bytes], bool] | None = None
        self.framing = Framing.PENDING
        self.frames: ClientFrames | None = None

    def data_received(self, data: bytes) -> None:
        if self.framing is Framing.PENDING:
            if self.protocol.state is not State.OPEN:
                super().data_received(data)
                return
            self._choose_framing()
        frames = self.frames
        if frames is None:
            super().data_received(data)
            return
        protocol = self.protocol
        cuts = frames.feed(data)
        for i, cut in enumerate(cuts):
            if cut.text is not None and protocol.state is State.OPEN and protocol.current_size is None:
                if not self._take_text(cut.text):
                    super().process_event(WsFrame(Opcode.TEXT, cut.text))
                continue
            super().data_received(cut.raw)
            if protocol.state is not State.OPEN or frames.spent or protocol.current_size is not None:
                # Closing, failed, a header it refuses, or a fragmented message (it bounds the
                # message's size as the fragments come): websockets reads what follows.
                self.framing, self.frames = Framing.LIBRARY, None
                rest = b"".join(c.raw for c in cuts[i + 1 :]) + frames.take_partial()
                if rest:
                    super().data_received(rest)
                return

    def _choose_framing(self) -> None:
        """Cut frames here only from a frame boundary of websockets' parser: nothing in its
        buffer and its generator waiting for a frame's first byte (a client that sent frames
        with its handshake request may have left it mid-frame: then it keeps the stream)."""
        protocol = self.protocol
        self.framing = Framing.LIBRARY
        try:  # websockets' internals (pinned to 17.x): if they change, it keeps the stream
            waiting: Any = protocol.parser
            while getattr(waiting, "gi_yieldfrom", None) is not None:
                waiting = waiting.gi_yieldfrom
            at_boundary = not protocol.reader.buffer and getattr(waiting, "__name__", "") == "at_eof"
            max_size = protocol.max_message_size
            usable = protocol.current_size is None and not protocol.extensions
        except AttributeError:
            return
        if at_boundary and usable and max_size is not None:
            self.framing, self.frames = Framing.OURS, ClientFrames(max_size)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        break_error_cycles(self)

    def process_event(self, event: Any) -> None:
        if type(event) is WsFrame and event.opcode is Opcode.TEXT and event.fin:
            data = event.data
            if self._take_text(data if type(data) is bytes else bytes(data)):
                return
        super().process_event(event)

    def _take_text(self, data: bytes) -> bool:
        """Hand a whole text frame to `on_message`; False: it takes websockets' way."""
        on_message = self.on_message
        if on_message is None or len(self.recv_messages.frames):  # never ahead of one queued
            return False
        try:
            return on_message(data)
        except Exception:
            # Raised out of data_received it would abort the socket (1006) and lose the
            # rest of this read: close it as websockets would a failed handler.
            log.exception("client frame handler failed")
            self.on_message = None
            self.loop.create_task(self.close(CloseCode.INTERNAL_ERROR, "internal error"))
            return True


class GatewayMetrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = r = CollectorRegistry()
        self.closes = Counter("ringside_gateway_closes", "Client sockets closed", ["code"], registry=r)
        self.hellos = Counter("ringside_gateway_hellos", "Hello attempts", ["result"], registry=r)
        self.revocation_unchecked = Counter(
            "ringside_gateway_revocation_unchecked",
            "Hellos let in without a revocation check (Redis unreachable)",
            registry=r,
        )
        self.undurable_dropped = Counter(
            "ringside_gateway_undurable_dropped",
            "Acknowledged requests of closed sessions given up before they were durable",
            registry=r,
        )
        self.fills = Counter("ringside_gateway_fills", "Gap fills asked of owners", registry=r)
        self.replayed = Counter(
            "ringside_gateway_replayed_requests", "Requests replayed to a new owner", registry=r
        )
        Gauge("ringside_gateway_sessions", "Open sessions", registry=r).set_function(
            lambda: len(gateway.sessions)
        )
        Gauge("ringside_gateway_links_up", "Node links connected", registry=r).set_function(
            lambda: sum(1 for link in gateway.links.values() if link is not None and link.is_open)
        )
        # -- observability (issue 8) --
        # Counted per request: plain numbers, exported at scrape time (server/hotmetrics.py).
        self.requests = Count("ringside_gateway_requests", "Client requests forwarded")
        self.request_seconds = LatencyHistogram(
            "ringside_gateway_request_seconds",
            "Round trip of a request at the gateway, client frame in to reply out (sampled)",
            LATENCY_BUCKETS,
        )
        self.pushes = Count("ringside_gateway_pushes", "Pushed events delivered to clients")
        for collector in (self.requests, self.request_seconds, self.pushes):
            r.register(collector)
        self.session_moves = Counter(
            "ringside_gateway_session_moves",
            "Sessions re-attached to a new owner (failover, drain)",
            registry=r,
        )
        self.move_seconds = Histogram(
            "ringside_gateway_move_seconds",
            "Time a session spent moving between owners",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.member_events = Counter(
            "ringside_gateway_member_events",
            "Membership changes seen",
            ["from_state", "to_state"],
            registry=r,
        )
        r.register(MemberStates("ringside_gateway_members", gateway.membership))
        r.register(LinkBytes("ringside_gateway_link_bytes", gateway.links))


_T = TypeVar("_T")


def stop_replaced_gateway(pid: int) -> None:
    """SIGTERM to the gateway a restart replaces, once the new one is ready to listen: a new
    gateway that fails before that (a bad config, an import error) leaves the old serving."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        log.info("the gateway to replace has exited already", extra={"pid": pid})
    else:
        log.info("replacing the running gateway: it stops, this one takes its ports", extra={"pid": pid})


async def bind_when_free(bind: Callable[[], Awaitable[_T]], port: int, deadline: float | None) -> _T:
    """`bind()` now; or, replacing a gateway (a `deadline`), as soon as it frees `port`."""
    started = time.monotonic()
    waiting = False
    while True:
        try:
            bound = await bind()
        except OSError as exc:
            # uvloop reports a UDP port in use as an OSError without errno, caused by one with it
            in_use = errno.EADDRINUSE in (exc.errno, getattr(exc.__cause__, "errno", None))
            if not in_use or deadline is None:
                raise
            if time.monotonic() > deadline:
                waited = f"{time.monotonic() - started:.1f}s"
                raise OSError(exc.errno, f"port {port} still in use after {waited} (replace_wait_s)") from exc
            if not waiting:
                log.info("waiting for the gateway replaced to free a port", extra={"port": port})
                waiting = True
            await asyncio.sleep(0.01)
            continue
        if waiting:
            log.info("port taken", extra={"port": port, "waited_s": round(time.monotonic() - started, 3)})
        return bound


class Gateway:
    def __init__(self, config: ClusterConfig, *, replace: int | None = None) -> None:
        """`replace`: the pid of a running gateway this one takes over from (a restart): it is
        stopped once this one is ready to listen, and its ports are taken as it frees them."""
        self.config = config
        self._replace = replace
        self.settings = config.gateway
        self.store = Store(config.redis.effective_url, max_connections=8)
        self._link_keyring = config.link_keyring
        self.membership = Membership(
            config,
            name="gateway",
            host=self.settings.host,
            port=self.settings.gossip_port,
            meta={"role": "gateway"},
            on_ring_change=self._on_ring_change,
        )
        self.links: dict[str, Link | None] = {}
        self._link_tasks: dict[str, asyncio.Task[None]] = {}
        self.sessions: dict[int, ClientSession] = {}
        self.sessions_by_player: dict[str, ClientSession] = {}
        self._per_address: dict[str, int] = {}  # open sockets per source IP
        self._session_prefix = random.getrandbits(24) << 32
        self._session_counter = 0
        self.started_at = time.time()
        self.metrics = GatewayMetrics(self)
        self.gc = GcPolicy(config.gc)
        self.metrics.registry.register(self.gc)
        self._stopping = asyncio.Event()
        self._ring_known = asyncio.Event()  # the ring has had members: gossip has told us the cluster
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ring(self) -> HashRing:
        return self.membership.ring

    # -- membership -------------------------------------------------------
    def _on_ring_change(self, ring: HashRing) -> None:
        if ring.members:
            self._ring_known.set()
        loop = asyncio.get_running_loop()
        for name in ring.members:
            if name not in self._link_tasks:
                self.links[name] = None
                self._link_tasks[name] = loop.create_task(self._maintain_link(name))
        for name in [n for n in self._link_tasks if n not in ring.members]:
            self._link_tasks.pop(name).cancel()
            link = self.links.pop(name, None)
            if link is not None:
                link.close()
        if not ring.members:
            return
        now = time.monotonic()
        moved = 0
        for cs in list(self.sessions.values()):
            core = cs.core
            owner = ring.owner(f"player:{core.player}")
            if owner == core.node and core.state is not SessionState.MOVING:
                continue
            if core.state in (SessionState.PINNED, SessionState.ATTACHING):
                old = self.links.get(core.node)
                if old is not None:
                    old.send(Kind.DETACH, core.id)
                core.moving(now)
                moved += 1
            self._reattach(cs)
        if moved:
            log.info("sessions moving after a ring change", extra={"sessions": moved})

    # -- node links -------------------------------------------------------
    async def _maintain_link(self, name: str) -> None:
        base = self.settings.link_retry_base_ms / 1000
        cap = self.settings.link_retry_cap_ms / 1000
        attempt = 0
        while True:
            address = self.membership.link_address(name)
            if address is None:
                await asyncio.sleep(0.05)
                continue
            try:
                link = await dial_link(
                    lambda: Link(
                        self._on_frames,
                        lambda _link: None,
                        max_frame=self.config.node.max_link_frame_bytes,
                        write_buffer=self.config.node.link_write_buffer_bytes,
                        auth_key=self.config.link_key,
                        accepting=False,
                        keyring=self._link_keyring,
                        name=name,
                    ),
                    address,
                    unix=self.config.node.unix_links,
                )
            except OSError as exc:
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:  # a node down for a drill: not a flood
                    log.warning(
                        "link to a node failed; retrying",
                        extra={
                            "node": name,
                            "address": f"{address[0]}:{address[1]}",
                            "attempt": attempt,
                            "error": str(exc),
                        },
                    )
                # The exponent stops at 30: 2**1024 is past a float, and the OverflowError
                # would end this task, and with it the gateway's link to the node, for good.
                await asyncio.sleep(random.uniform(0, min(cap, base * 2 ** min(attempt, 30))))
                continue
            attempt = 0
            self.links[name] = link
            log.info("link up", extra={"node": name, "via": link.via})
            self._on_link_up(name)
            try:
                await link.closed
            except asyncio.CancelledError:
                link.close()
                raise
            if self.links.get(name) is link:
                self.links[name] = None
            log.warning("link down", extra={"node": name})
            self.membership.probe(name)  # fast evidence; only SWIM declares it faulty
            self._on_link_down(name)

    def _on_link_up(self, name: str) -> None:
        for cs in list(self.sessions.values()):
            if cs.core.state is SessionState.MOVING and self._owner(cs.core.player) == name:
                self._reattach(cs)

    def _owner(self, player: str) -> str | None:
        ring = self.membership.ring
        return ring.owner(f"player:{player}") if ring.members else None

    def _on_link_down(self, name: str) -> None:
        now = time.monotonic()
        for cs in list(self.sessions.values()):
            core = cs.core
            if core.node == name and core.state in (SessionState.PINNED, SessionState.ATTACHING):
                core.moving(now)

    def _reattach(self, cs: ClientSession, node: str | None = None) -> None:
        """Attach to `node` (a MOVED hint), else to the player's owner in our ring."""
        owner = node or self._owner(cs.core.player)
        if owner is None:
            return  # no node in the ring: the move watchdog retries, then gives up
        link = self.links.get(owner)
        if link is None or not link.is_open:
            return  # picked up by _on_link_up when the owner's link is back
        cs.core.reattaching(owner)
        link.send(Kind.ATTACH, cs.core.id, payload=cs.core.player.encode())

    def _on_frames(self, link: Link, frames: list[Frame]) -> None:
        sessions = self.sessions
        for frame in frames:
            cs = sessions.get(frame.session)
            if cs is None or cs.core.node != link.name:
                continue  # a node this session has moved away from
            kind = frame.kind
            core = cs.core
            if kind is Kind.REPLY:
                if core.on_reply(frame.seq, frame.aux):
                    cs.push(frame.payload)
                    if frame.seq == cs.probe_seq:
                        cs.probe_seq = 0
                        self.metrics.request_seconds.observe(time.perf_counter() - cs.probe_at)
                    if cs.closing is not None:
                        cs.finish_if_answered()
                if core.has_space:
                    cs.wake_reader()
                if cs.detached_at is not None:
                    self._release_if_durable(cs)
            elif kind is Kind.PUSH:
                verdict = core.on_push(frame.aux, frame.seq)
                if verdict is PushVerdict.DELIVER:
                    cs.push(frame.payload)
                    self.metrics.pushes.value += 1
                elif verdict is PushVerdict.GAP:
                    self._request_fill(cs, link, frame.aux)
            elif kind is Kind.DURABLE:
                core.on_durable(frame.seq)
                if core.has_space:
                    cs.wake_reader()
                if cs.detached_at is not None:
                    self._release_if_durable(cs)
            elif kind is Kind.ATTACHED:
                self._on_attached(cs, link, frame)
            elif kind is Kind.SESSION_LOST:
                if core.state is SessionState.PINNED:
                    core.moving(time.monotonic())
                    self._reattach(cs)
            elif kind is Kind.MOVED:
                self._on_moved(cs, link, frame)
            elif kind is Kind.ERROR:
                self._on_attach_error(cs, frame)

    def _request_fill(self, cs: ClientSession, link: Link, stream: int) -> None:
        now = time.monotonic()
        last = cs.core.last_pushed(stream)
        if cs.fills.get(stream) == last and now - cs.fill_sent_at < FILL_RETRY_S:
            return  # a fill from there is under way
        cs.fills[stream] = last
        cs.fill_sent_at = now
        self.metrics.fills.inc()
        link.send(Kind.FILL, cs.core.id, last, stream)

    def _on_attached(self, cs: ClientSession, link: Link, frame: Frame) -> None:
        core = cs.core
        if core.state is not SessionState.ATTACHING:
            return
        if not core.fresh and core.moving_since is not None:
            self.metrics.session_moves.inc()
            self.metrics.move_seconds.observe(time.monotonic() - core.moving_since)
        moved = not core.fresh
        replay = core.attached(link.name, frame.seq)
        for seq, payload in replay:
            link.send(Kind.REQUEST, core.id, seq, 0, payload)
        if replay:
            self.metrics.replayed.inc(len(replay))
        if moved:
            # An event pushed to the actor while no session was attached to it (mid-move)
            # reached no one; if it was a game's last, no later one reveals the gap. Ask
            # the new owner for whatever follows what this client has.
            for stream, last in core.streams():
                link.send(Kind.FILL, core.id, last, stream)
        if not cs.attached.done():
            cs.attached.set_result(None)

    def _on_moved(self, cs: ClientSession, link: Link, frame: Frame) -> None:
        """The actor migrated (a drain, a scale-up): follow it before our ring says so."""
        core = cs.core
        if core.state not in (SessionState.PINNED, SessionState.ATTACHING):
            return
        link.send(Kind.DETACH, core.id)
        core.moving(time.monotonic())
        target = self.links.get(frame.payload.decode(errors="replace"))
        if target is not None and target.is_open:
            self._reattach(cs, target.name)
        # Else a node we have no link to yet (it just joined): the move watchdog re-attaches
        # by our ring in a moment, rather than bouncing off the old node at once.

    def _on_attach_error(self, cs: ClientSession, frame: Frame) -> None:
        if not cs.attached.done():
            try:
                message = orjson.loads(frame.payload)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = "attach failed"
            cs.attached.set_exception(HelloRefused(CloseCode.TRY_AGAIN_LATER, "unavailable", message))
            return
        # A re-attach failed (the node could not reach Redis): try again shortly.
        core = cs.core
        if core.state is SessionState.ATTACHING:
            core.transition(SessionState.MOVING)
            asyncio.get_running_loop().call_later(0.2, self._retry_move, cs)

    def _retry_move(self, cs: ClientSession) -> None:
        if cs.core.state is SessionState.MOVING and self.sessions.get(cs.core.id) is cs:
            self._reattach(cs)

    async def _watch_moves(self) -> None:
        timeout = self.settings.move_timeout_s
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for cs in list(self.sessions.values()):
                since = cs.core.moving_since
                if since is not None and now - since > timeout:
                    cs.close(CloseCode.OWNER_LOST, "the player's node stayed unreachable")
                    if cs.detached_at is not None:
                        self._give_up(cs, "its node stayed unreachable")
                elif cs.detached_at is not None and now - cs.detached_at > 3 * timeout:
                    self._give_up(cs, "they were not reported durable in time")
                elif cs.core.state is SessionState.MOVING:
                    self._reattach(cs)
                elif cs.fills and now - cs.fill_sent_at > FILL_RETRY_S:
                    self._retry_fills(cs)

    def _retry_fills(self, cs: ClientSession) -> None:
        """A gap the owner did not fill (the FILL or its answer was lost in a move): ask
        again. Streams that moved past the seq a fill was asked from are done."""
        core = cs.core
        for stream, asked_from in list(cs.fills.items()):
            if core.last_pushed(stream) > asked_from:
                del cs.fills[stream]
        if not cs.fills:
            cs.fill_retries = 0
            return
        cs.fill_retries += 1
        if cs.fill_retries > MAX_FILL_RETRIES:
            log.warning("gap not filled; giving up", extra={"session": f"{core.id:x}"})
            cs.fills.clear()
            cs.fill_retries = 0
            return
        link = self.links.get(core.node)
        if core.state is SessionState.PINNED and link is not None:
            for stream in list(cs.fills):
                cs.fills[stream] = -1  # so _request_fill does not skip it as under way
                self._request_fill(cs, link, stream)

    def _give_up(self, cs: ClientSession, why: str) -> None:
        log.error(
            "dropping a closed session's requests that are not durable",
            extra={"session": f"{cs.core.id:x}", "requests": cs.core.buffered, "why": why},
        )
        self.metrics.undurable_dropped.inc(cs.core.buffered)
        self._release(cs)

    # -- clients ----------------------------------------------------------
    async def _hello(self, ws: ServerConnection) -> str:
        try:
            raw = await asyncio.wait_for(ws.recv(decode=False), self.settings.handshake_timeout_s)
        except TimeoutError as exc:
            raise HelloRefused(CloseCode.HANDSHAKE_TIMEOUT, "handshake_timeout", "no hello in time") from exc
        try:
            hello = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HelloRefused(CloseCode.BAD_HELLO, "bad_json", "hello is not valid JSON") from exc
        if not isinstance(hello, dict) or hello.get("op") != "hello":
            raise HelloRefused(CloseCode.BAD_HELLO, "bad_hello", 'first frame must be {"op": "hello"}')
        try:
            claims = verify(self.config.secret_bytes, hello.get("token"), now=time.time())
        except TokenError as exc:
            raise HelloRefused(CloseCode.UNAUTHORIZED, "unauthorized", f"token {exc.reason}") from exc
        if claims.token_id:
            try:
                revoked = await self.store.is_revoked(claims.token_id)
            except StoreUnavailable:
                # Fail open: with Redis away, players whose actors are in memory can still
                # play; revocation resumes with Redis. Counted so operators see it.
                self.metrics.revocation_unchecked.inc()
                revoked = False
            if revoked:
                raise HelloRefused(CloseCode.UNAUTHORIZED, "unauthorized", "token revoked")
        return claims.player

    async def handle(self, ws: ServerConnection) -> None:
        address = ws.remote_address[0] if ws.remote_address else ""
        per_address = self._per_address.get(address, 0)
        if (
            len(self.sessions) >= self.settings.max_sessions
            or per_address >= self.settings.max_sessions_per_address
        ):
            self.metrics.closes.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()
            await ws.close(CloseCode.TRY_AGAIN_LATER, "gateway full")
            return
        self._per_address[address] = per_address + 1
        try:
            await self._handle(ws)
        finally:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]

    async def _handle(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and self.settings.socket_send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_send_buffer)
        cs: ClientSession | None = None
        try:
            player = await self._hello(ws)
            cs = await self._open_session(ws, player)
            self.metrics.hellos.labels("ok").inc()
            await self._serve(cs)
        except HelloRefused as refused:
            self.metrics.hellos.labels(refused.code).inc()
            self.metrics.closes.labels(str(int(refused.close))).inc()
            frame = {"op": "error", "error": {"code": refused.code, "message": refused.message}}
            try:
                await ws.send(orjson.dumps(frame), text=True)
                await ws.close(refused.close, refused.message[:120])
            except ConnectionClosed:
                pass
        except ConnectionClosed:
            pass
        finally:
            if cs is not None:
                self._close_session(cs)
            break_error_cycles(ws)

    async def _open_session(self, ws: ServerConnection, player: str) -> ClientSession:
        if not self._ring_known.is_set():
            # Serving before gossip has told us the ring: a restart takes the client port
            # while the gateway it replaces is still leaving the gossip.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ring_known.wait(), self.settings.attach_timeout_s)
        previous = self.sessions_by_player.get(player)
        if previous is not None:
            cs = self._take_over(previous, ws)
            core = cs.core
        else:
            owner = self._owner(player)
            if owner is None:
                raise HelloRefused(CloseCode.TRY_AGAIN_LATER, "unavailable", "no node is up")
            self._session_counter += 1
            core = Session(
                self._session_prefix | self._session_counter,
                player,
                owner,
                max_replay=self.settings.max_replay,
            )
            cs = self._client_session(core, ws)
            core.moving(time.monotonic())
            self._reattach(cs)  # now, or as soon as the owner's link is up
        try:
            try:
                await asyncio.wait_for(asyncio.shield(cs.attached), self.settings.attach_timeout_s)
            except TimeoutError as exc:
                raise HelloRefused(
                    CloseCode.TRY_AGAIN_LATER, "unavailable", f"node {core.node} did not attach"
                ) from exc
            welcome = {"op": "welcome", "player": player, "session": f"{core.id:x}"}
            await ws.send(orjson.dumps(welcome), text=True)  # the client may be gone already
        except BaseException:
            self._close_session(cs)
            raise
        cs.welcome_sent()
        return cs

    def _client_session(self, core: Session, ws: ServerConnection) -> ClientSession:
        cs = ClientSession(
            core,
            ws,
            self.settings.max_outbound,
            lambda code: self.metrics.closes.labels(str(int(code))).inc(),
            TokenBucket(self.settings.rate_limit_per_s, self.settings.rate_limit_burst, time.monotonic()),
        )
        self.sessions[core.id] = cs
        self.sessions_by_player[core.player] = cs
        return cs

    def _take_over(self, previous: ClientSession, ws: ServerConnection) -> ClientSession:
        """A newer hello for the player continues its session (sequence numbers, requests
        not yet durable) on the new socket; the older socket, if still open, gets 4003."""
        if previous.detached_at is None:
            previous.close(CloseCode.SESSION_REPLACED, "a newer session for this player took over")
        previous.detached_at = time.monotonic()
        previous.wake_reader()
        if previous.writer is not None:
            previous.writer.cancel()
        cs = self._client_session(previous.core, ws)
        if previous.attached.done() and previous.core.state is SessionState.PINNED:
            cs.attached.set_result(None)
        return cs

    async def _serve(self, cs: ClientSession) -> None:
        ws = cs.ws
        core = cs.core
        if isinstance(ws, GatewayConnection):
            ws.on_message = lambda payload: self._on_client_frame(cs, payload)
        try:
            while True:
                # Frames the fast path could not take: no replay space, or queued behind one.
                payload = await ws.recv(decode=False)
                while not core.has_space and cs.detached_at is None and cs.close_code is None:
                    await cs.wait_for_space()
                if cs.close_code is None and core.state is not SessionState.CLOSED and cs.detached_at is None:
                    self._forward(cs, payload)
                if cs.close_code is not None or cs.closing is not None:
                    # Our close code, not the 1000 of a returning handler. Not reading on
                    # fills websockets' queue, which pauses the socket: a flooding client
                    # whose close is under way is not read (and parsed) at line rate.
                    await ws.wait_closed()
                    return
                if core.state is SessionState.CLOSED or cs.detached_at is not None:
                    return
        finally:
            if isinstance(ws, GatewayConnection):
                ws.on_message = None

    def _on_client_frame(self, cs: ClientSession, payload: bytes) -> bool:
        """A client frame, from the protocol callback. False: let the reader task take it
        (it waits for replay space, which must not happen out of order)."""
        if (
            cs.space is not None
            or not cs.core.has_space
            or cs.close_code is not None
            or cs.closing is not None
            or cs.detached_at is not None
            or cs.core.state is SessionState.CLOSED
        ):
            # The reader holds an earlier frame or will have to wait, or the session is
            # going and the reader stops: either way websockets' queue takes the frame,
            # and past its bound the socket is paused (a closing client is not read on).
            return False
        self._forward(cs, payload)
        return True

    def _forward(self, cs: ClientSession, payload: bytes) -> None:
        """Count the frame against the rate limit and send it to the player's owner (or
        keep it for replay while the session moves)."""
        if cs.closing is not None:
            return  # not applied: the client gets no reply for it, then the close
        if not cs.bucket.take(time.monotonic()):
            cs.finish(CloseCode.RATE_LIMITED, "too many frames; slow down", self.settings.move_timeout_s)
            return
        core = cs.core
        seq = core.submit(payload)
        self.metrics.requests.value += 1
        if cs.probe_seq == 0:
            cs.probe_seq = seq
            cs.probe_at = time.perf_counter()
        if core.state is SessionState.PINNED:
            link = self.links.get(core.node)
            if link is not None:
                link.send(Kind.REQUEST, core.id, seq, 0, payload)

    def _close_session(self, cs: ClientSession) -> None:
        """The client's socket is gone. Requests it was told "ok" for may not be durable
        yet: keep the session (and its replay buffer) until they are, then release it."""
        core = cs.core
        if cs.closing is not None:
            cs.closing[2].cancel()  # the socket is gone: no close to send
        if self.sessions.get(core.id) is not cs:
            return  # taken over by a newer socket, or released already
        if cs.detached_at is None:
            cs.detached_at = time.monotonic()
        cs.wake_reader()
        if cs.writer is not None:
            cs.writer.cancel()
        cs.outbound = None  # nobody will read it
        if core.buffered and core.state is not SessionState.CLOSED:
            return  # _release_if_durable finishes it
        self._release(cs)

    def _release_if_durable(self, cs: ClientSession) -> None:
        if cs.detached_at is not None and not cs.core.buffered:
            self._release(cs)

    def _release(self, cs: ClientSession) -> None:
        core = cs.core
        if self.sessions.get(core.id) is not cs:
            return
        del self.sessions[core.id]
        if self.sessions_by_player.get(core.player) is cs:
            del self.sessions_by_player[core.player]
        link = self.links.get(core.node)
        if link is not None:
            link.send(Kind.DETACH, core.id)
        core.close()

    # -- admin ------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        if not self.ring.members:
            return False, "no node in the ring yet"
        down = [n for n in self.ring.members if not (link := self.links.get(n)) or not link.is_open]
        return (not down, "ok" if not down else f"links down: {down}")

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for cs in self.sessions.values():
            states[cs.core.state.value] = states.get(cs.core.state.value, 0) + 1
        return {
            "name": "gateway",
            "role": "gateway",
            "uptime_s": round(time.time() - self.started_at, 1),
            "sessions": len(self.sessions),
            "session_states": states,
            "links": {n: bool(link and link.is_open) for n, link in self.links.items()},
            "link_via": {n: link.via for n, link in self.links.items() if link and link.is_open},
            "membership": self.membership.status(),
            "gc": self.gc.status(),
        }

    # -- lifecycle --------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        dashboard = Dashboard(self)
        routes = admin_routes(
            status=self.status,
            health=self.health,
            registry=self.metrics.registry,
            websocket_path="/ws",
            extra_websocket_paths=(FEED_PATH,),
            pages=dashboard.page,
            actions={"gc": lambda query: self.gc.reclaim(census=True)},
            admin_token=self.config.admin_token,
            loopback_only=not self.settings.admin_from_anywhere,
            admin_networks=self.settings.admin_network_list(),
        )
        allowed = [o.strip() for o in self.settings.allowed_origins.split(",") if o.strip()]
        origins: list[Origin | None] | None = [Origin(o) for o in allowed] or None
        deadline = None
        if self._replace is not None:
            deadline = time.monotonic() + self.settings.replace_wait_s
            stop_replaced_gateway(self._replace)
        # The client port first: the gateway replaced frees it as it starts stopping, its
        # gossip port only once it is gone. Hellos meanwhile wait for the ring.
        server = await bind_when_free(
            lambda: serve(
                dashboard.route(self.handle),
                self.settings.listen_address,
                self.settings.port,
                create_connection=GatewayConnection,
                process_request=routes,
                max_size=self.settings.max_frame_bytes,
                compression=None,
                close_timeout=self.settings.close_timeout_s,
                origins=origins,
            ),
            self.settings.port,
            deadline,
        )
        await bind_when_free(self.membership.start, self.settings.gossip_port, deadline)
        self._tasks.append(loop.create_task(self._watch_moves()))
        self._tasks.append(loop.create_task(count_member_events(self.membership, self.metrics.member_events)))
        log.info(
            "gateway started", extra={"url": f"ws://{self.settings.listen_address}:{self.settings.port}/ws"}
        )
        self.gc.start()
        self._tasks.append(loop.create_task(self.gc.run()))
        await self._stopping.wait()
        log.info("gateway stopping", extra={"sessions": len(self.sessions)})
        server.close(close_connections=False)
        # Each session closes (1001) once the requests it forwarded have their replies, so a
        # client knows what was applied; before, requests in flight were applied unanswered.
        sessions = list(self.sessions.values())
        for cs in sessions:
            cs.finish(CloseCode.GOING_AWAY, "gateway shutting down", self.settings.stop_reply_timeout_s)
        # Leave the gossip while the clients close: a restart's new gateway (`replace`) takes
        # the gossip port only once this process is gone. It has the client port already.
        leaving = loop.create_task(
            self.membership.leave(self.settings.leave_timeout_s, linger=self.settings.leave_linger_s)
        )
        await asyncio.sleep(0.1)
        answered_by = time.monotonic() + self.settings.stop_reply_timeout_s
        while any(cs.close_code is None for cs in sessions) and time.monotonic() < answered_by:
            await asyncio.sleep(0.01)
        server.close()
        try:
            async with asyncio.timeout(self.settings.stop_close_timeout_s):
                await server.wait_closed()
        except TimeoutError:
            # Clients that have not finished their closing handshake (they got the 1001 frame,
            # or were not reading): cut, rather than hold the restart for close_timeout_s.
            # all_connections (websockets 14+) has the closing ones too; connections has not.
            stuck = list(getattr(server, "all_connections", server.connections))
            log.info("cutting clients that did not close in time", extra={"clients": len(stuck)})
            for ws in stuck:
                ws.transport.abort()
            await server.wait_closed()
        await dashboard.stop()
        for task in [*self._tasks, *self._link_tasks.values()]:
            task.cancel()
        await leaving
        await self.store.close()
        self.gc.close()
