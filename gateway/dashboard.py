"""The operator dashboard: a page at `/`, a live WebSocket feed, drain and restart.

The gateway serves `gateway/static/dashboard.html` at `/` and pushes one JSON
snapshot a second (and at once on a membership change) over `/dashboard/feed`.
A snapshot joins what the gateway knows itself (members and states, the ring,
its sessions, request rate and sampled p99) with each node's `/status` and
`/metrics`, fetched over HTTP from the admin address in the node's gossip meta.

Admin token. The page needs it (`?token=` on the URL or `Authorization: Bearer`);
the feed needs it in its first message, so it never travels in a feed URL. A
token in the page URL can land in browser history, screenshots and proxy logs:
the page takes it out of the address bar at once (keeping it in sessionStorage
for reloads) and is served with `Referrer-Policy: no-referrer`; the gateway
logs no URLs. Serve the gateway's admin surface on an operator network only,
and rotate `RINGSIDE_ADMIN_TOKEN` if a URL leaked.

Buttons act over the same feed: `{"action": "drain"|"restart", "node": "n2"}`.
Drain proxies the node's `/admin/drain` with the admin token; restart drains,
then starts the node again through `LocalCluster`, so it works for clusters run
by `ringside up` on the gateway's host and answers with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from server.admin import http_response
from server.link import Link
from server.membership import Membership
from server.ring import HashRing

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("ringside.dashboard")

FEED_PATH = "/dashboard/feed"
PAGE_PATHS = frozenset({"/", "/dashboard"})
PAGE_FILE = Path(__file__).with_name("static") / "dashboard.html"
TICK_S = 1.0
NODE_HTTP_TIMEOUT_S = 0.5
MAX_FEEDS = 16  # browsers watching at once; more are closed with 1013
AUTH_TIMEOUT_S = 5.0
RING_SECTORS = 180  # the ring picture: owner of each 2-degree slice of the hash space
LATENCY_WINDOW = 5  # ticks the p99 is computed over
STATES = ("alive", "suspect", "faulty", "leaving", "left")


# -- Prometheus collectors read at scrape time ---------------------------------------
class MemberStates:
    """Gossip members by state, as this process sees them."""

    def __init__(self, name: str, membership: Membership) -> None:
        self.name = name
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, "Gossip members by state", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for member in self.membership.endpoint.swim.members.values():
            counts[member.state.value] = counts.get(member.state.value, 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family


class LinkBytes:
    """Bytes on the open node links, by node and direction (a closed link resets its node)."""

    def __init__(self, name: str, links: Mapping[str, Link | None]) -> None:
        self.name = name
        self.links = links

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, "Bytes on node links", labels=["node", "direction"])
        for name, link in list(self.links.items()):
            if link is not None:
                family.add_metric([name, "in"], link.bytes_in)
                family.add_metric([name, "out"], link.bytes_out)
        yield family


async def count_member_events(membership: Membership, counter: Counter) -> None:
    """Count membership transitions (suspicions, refutations, faulty, leaves) until cancelled."""
    async for event in membership.endpoint.events():
        previous = event.previous.value if event.previous else "none"
        counter.labels(previous, event.member.state.value).inc()


# -- a tiny HTTP client for the nodes' admin ports -----------------------------------
async def http_get(
    host: str, port: int, path: str, *, token: str = "", timeout: float = NODE_HTTP_TIMEOUT_S
) -> tuple[int, bytes]:
    """GET `path`; returns (status, body), or (0, b"") if the node did not answer in time."""
    headers = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if token:
        headers += f"Authorization: Bearer {token}\r\n"
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write((headers + "\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = next(
                (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")),
                None,
            )
            body = await (reader.readexactly(length) if length is not None else reader.read())
            return status, body
    except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
        return 0, b""
    finally:
        if writer is not None:
            writer.close()


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Like PromQL's histogram_quantile over cumulative (upper bound, count) buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def ring_sectors(ring: HashRing, sectors: int = RING_SECTORS) -> list[str]:
    """Owner of the middle of each of `sectors` equal slices of the hash space."""
    points: list[int] = getattr(ring, "_points", [])
    owners: list[str] = getattr(ring, "_owners", [])
    if not points:
        return []
    from bisect import bisect_right

    step = (1 << 64) // sectors
    return [owners[bisect_right(points, i * step + step // 2) % len(points)] for i in range(sectors)]


def _config_path() -> str | None:
    """The `--config` this gateway was started with (`ringside ... gateway`), if any."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


class Dashboard:
    """Serves the page, keeps one snapshot a second while someone watches, runs actions."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.token = gateway.config.admin_token
        self.feeds: set[ServerConnection] = set()
        self.snapshot = b""  # none until the first collect
        self._tick = asyncio.Event()  # replaced after each snapshot; feeds wait on it
        self._poke = asyncio.Event()  # a membership change: refresh now
        self._collector: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._actions: set[asyncio.Task[None]] = set()
        self._node_requests: dict[str, tuple[float, float]] = {}  # node -> (t, requests total)
        self._node_cache: dict[str, dict[str, Any]] = {}
        self._gateway_requests: tuple[float, float] | None = None
        self._latency: deque[list[tuple[float, float]]] = deque(maxlen=LATENCY_WINDOW + 1)
        self._ring_key: tuple[str, ...] | None = None
        self._sectors: list[str] = []
        self.action_log: deque[dict[str, Any]] = deque(maxlen=20)

    # -- HTTP ---------------------------------------------------------------------
    def authorized(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def page(self, conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path not in PAGE_PATHS:
            return None
        given = parse_qs(url.query).get("token", [""])[0] or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        if not self.authorized(given):
            body = (
                b"<!doctype html><title>Ringside</title><h1>401: admin token required</h1>"
                b"<p>Open the URL that <code>make dashboard</code> prints.</p>"
            )
            return http_response(conn, HTTPStatus.UNAUTHORIZED, body, "text/html; charset=utf-8")
        response = http_response(conn, HTTPStatus.OK, PAGE_FILE.read_bytes(), "text/html; charset=utf-8")
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    def route(self, clients: Callable[[ServerConnection], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """The server's WebSocket handler: the feed path here, everything else to `clients`."""

        async def handler(ws: ServerConnection) -> None:
            if ws.request is not None and urlsplit(ws.request.path).path == FEED_PATH:
                await self.feed(ws)
            else:
                await clients(ws)

        return handler

    # -- the feed -----------------------------------------------------------------
    async def feed(self, ws: ServerConnection) -> None:
        if len(self.feeds) >= MAX_FEEDS:
            await ws.close(1013, "too many dashboards open")
            return
        try:
            first = await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT_S)
            hello = orjson.loads(first)
            if not isinstance(hello, dict) or not self.authorized(str(hello.get("token", ""))):
                await ws.close(1008, "admin token required")
                return
        except (TimeoutError, ConnectionClosed, orjson.JSONDecodeError):
            await ws.close(1008, "admin token required")
            return
        self.feeds.add(ws)
        self._ensure_running()
        sender = asyncio.get_running_loop().create_task(self._send_loop(ws))
        try:
            async for message in ws:
                await self._on_message(ws, message)
        except ConnectionClosed:
            pass
        finally:
            self.feeds.discard(ws)
            sender.cancel()

    async def _send_loop(self, ws: ServerConnection) -> None:
        # A slow browser skips snapshots; it never holds up the others.
        try:
            if self.snapshot:
                await ws.send(self.snapshot.decode())
            while True:
                tick = self._tick
                await tick.wait()
                await ws.send(self.snapshot.decode())
        except ConnectionClosed:
            pass

    async def _on_message(self, ws: ServerConnection, message: str | bytes) -> None:
        try:
            msg = orjson.loads(message)
            action, node, ident = str(msg["action"]), str(msg["node"]), msg.get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await ws.send(orjson.dumps({"reply": None, "ok": False, "detail": "bad message"}).decode())
            return
        if action not in ("drain", "restart"):
            await ws.send(orjson.dumps({"reply": ident, "ok": False, "detail": "no such action"}).decode())
            return
        task = asyncio.get_running_loop().create_task(self._act(ws, ident, action, node))
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _act(self, ws: ServerConnection, ident: Any, action: str, node: str) -> None:
        peer = ws.remote_address[0] if ws.remote_address else "?"
        log.info("dashboard action", extra={"action": action, "node": node, "peer": peer})
        if action == "drain":
            ok, detail = await self.drain(node)
        else:
            self._record(action, node, True, "draining, then starting it again")
            await self._reply(ws, ident, True, f"restarting {node}: draining first")
            ok, detail = await self.restart(node)
        self._record(action, node, ok, detail)
        await self._reply(ws, ident, ok, detail)

    async def _reply(self, ws: ServerConnection, ident: Any, ok: bool, detail: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(orjson.dumps({"reply": ident, "ok": ok, "detail": detail}).decode())

    def _record(self, action: str, node: str, ok: bool, detail: str) -> None:
        self.action_log.append(
            {"t": round(time.time(), 3), "action": action, "node": node, "ok": ok, "detail": detail}
        )
        self._poke.set()

    # -- actions ------------------------------------------------------------------
    def admin_address(self, node: str) -> tuple[str, int] | None:
        member = self.gateway.membership.member(node)
        admin = member.meta.get("admin") if member is not None else None
        if member is None or member.meta.get("role") != "node" or not admin:
            return None
        return str(admin[0]), int(admin[1])

    async def drain(self, node: str) -> tuple[bool, str]:
        """Proxy the node's `/admin/drain` with the admin token."""
        address = self.admin_address(node)
        if address is None:
            return False, f"{node} is not a known node"
        status, body = await http_get(*address, "/admin/drain", token=self.token, timeout=5.0)
        if status != 200:
            reason = ""
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                reason = f": {orjson.loads(body).get('error', '')}"
            return False, f"{node} answered drain with HTTP {status or 'nothing'}{reason}"
        try:
            before = orjson.loads(body)
        except orjson.JSONDecodeError:
            before = {}
        actors, sessions = before.get("actors", "?"), before.get("sessions", "?")
        return True, f"{node} draining: {actors} actors, {sessions} sessions"

    async def restart(self, node: str) -> tuple[bool, str]:
        from server.cluster import ClusterError, LocalCluster

        local = LocalCluster(self.gateway.config, _config_path(), progress=lambda line: None)
        if self.admin_address(node) is None or local.pid(node) is None:
            return False, f"restart needs {node} running under `ringside up` on the gateway's host"
        try:
            elapsed = await asyncio.to_thread(local.restart, node)
        except ClusterError as exc:
            return False, str(exc)
        return True, f"restarted {node} in {elapsed:.1f}s"

    # -- snapshots ----------------------------------------------------------------
    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._collector is None or self._collector.done():
            self._collector = loop.create_task(self._collect_loop())
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch_members())

    async def _watch_members(self) -> None:
        async for _ in self.gateway.membership.endpoint.events():
            self._poke.set()

    async def _collect_loop(self) -> None:
        while self.feeds:
            self._poke.clear()
            try:
                self.snapshot = orjson.dumps(await self.collect())
            except Exception:
                log.exception("dashboard snapshot failed")
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), TICK_S)

    async def collect(self) -> dict[str, Any]:
        gateway = self.gateway
        membership = gateway.membership
        now = time.monotonic()
        ring = membership.ring
        if ring.members != self._ring_key:
            self._ring_key = ring.members
            self._sectors = ring_sectors(ring)
        members = []
        nodes = []
        for member in sorted(membership.endpoint.swim.members.values(), key=lambda m: m.name):
            role = str(member.meta.get("role", "?"))
            members.append(
                {"name": member.name, "state": member.state.value, "role": role, "inc": member.incarnation}
            )
            if role == "node" and member.state.value in ("alive", "suspect", "leaving"):
                nodes.append(member.name)
        stats = await asyncio.gather(*(self._node_stats(name, now) for name in nodes))
        for name in list(self._node_cache):
            if name not in nodes:
                del self._node_cache[name]
                self._node_requests.pop(name, None)
        registry = gateway.metrics.registry
        total = float(self.gateway.metrics.requests.value)
        rps = None
        if self._gateway_requests is not None:
            t0, n0 = self._gateway_requests
            rps = max(0.0, (total - n0) / (now - t0)) if now > t0 else None
        self._gateway_requests = (now, total)
        p50, p99 = self._latency_quantiles()
        return {
            "t": round(time.time(), 3),
            "gateway": {
                "sessions": len(gateway.sessions),
                "rps": None if rps is None else round(rps, 1),
                "p50_ms": p50,
                "p99_ms": p99,
                "moves": registry.get_sample_value("ringside_gateway_session_moves_total") or 0,
                "links": {n: bool(link and link.is_open) for n, link in gateway.links.items()},
            },
            "members": members,
            "ring": {name: round(share, 4) for name, share in ring.share().items()},
            "sectors": self._sectors,
            "nodes": dict(zip(nodes, stats, strict=True)),
            "events": list(membership.recent)[-20:][::-1],
            "actions": list(self.action_log)[::-1],
        }

    def _latency_quantiles(self) -> tuple[float | None, float | None]:
        buckets = self.gateway.metrics.request_seconds.cumulative()
        self._latency.append(buckets)
        first = self._latency[0]
        window = [(b, c - c0) for (b, c), (_, c0) in zip(buckets, first, strict=True)]
        if len(self._latency) == 1 or not window or window[-1][1] <= 0:
            return None, None
        p50, p99 = quantile(0.5, window), quantile(0.99, window)
        return (
            None if p50 is None else round(p50 * 1000, 3),
            None if p99 is None else round(p99 * 1000, 3),
        )

    async def _node_stats(self, name: str, now: float) -> dict[str, Any]:
        address = self.admin_address(name)
        if address is None:
            return {"reachable": False}
        (code, body), (mcode, metrics) = await asyncio.gather(
            http_get(*address, "/status"), http_get(*address, "/metrics")
        )
        if code != 200:
            stale = dict(self._node_cache.get(name, {}))
            stale["reachable"] = False
            return stale
        status = orjson.loads(body)
        stats: dict[str, Any] = {
            "reachable": True,
            "state": status.get("state"),
            "sessions": status.get("sessions"),
            "actors": status.get("actors"),
            "dirty": status.get("dirty"),
            "flush_lag_s": status.get("flush_lag_s"),
            "degraded": status.get("degraded"),
            "handoffs": status.get("handoffs"),
            "rps": None,
        }
        if mcode == 200:
            total = metric_sum(metrics.decode(errors="replace"), "ringside_node_requests_total")
            previous = self._node_requests.get(name)
            if previous is not None and now > previous[0] and total >= previous[1]:
                stats["rps"] = round((total - previous[1]) / (now - previous[0]), 1)
            self._node_requests[name] = (now, total)
        self._node_cache[name] = stats
        return stats

    async def stop(self) -> None:
        for task in [self._collector, self._watcher, *self._actions]:
            if task is not None:
                task.cancel()
