"""`/metrics` after a scripted workload on real processes: exact counts where the
workload makes them deterministic, lower bounds across a SIGKILL failover."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from gateway.client import RingsideClient
from server.cluster import http_json
from server.errors import CloseCode
from tests.integration.conftest import Cluster, wait_until

UPDATES = 5
VICTIM = "n2"


def scrape(cluster: Cluster, name: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    import urllib.request

    with urllib.request.urlopen(cluster.local.admin_url(name) + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    families = list(text_string_to_metric_families(text))
    # A `_total` typed gauge misleads Prometheus's rate() and its type-aware tooling.
    totals = [f for f in families if any(s.name.endswith("_total") for s in f.samples)]
    mistyped = [f.name for f in totals if f.type != "counter"]
    assert not mistyped, f"{name}: _total metrics not typed counter: {mistyped}"
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def nodes_total(cluster: Cluster, name: str, **labels: str) -> float:
    return sum(value(scrape(cluster, n), name, **labels) for n in cluster.running_nodes())


def players_per_node(cluster: Cluster, per_node: int) -> list[str]:
    chosen: dict[str, list[str]] = {n: [] for n in cluster.config.node_names}
    i = 0
    while any(len(v) < per_node for v in chosen.values()):
        player = f"obs{i}"
        owned = chosen[cluster.owner(player)]
        if len(owned) < per_node:
            owned.append(player)
        i += 1
    return [p for ps in chosen.values() for p in ps]


def test_metrics_count_a_scripted_workload_and_a_failover(cluster: Cluster) -> None:
    players = players_per_node(cluster, 4)
    displaced = [p for p in players if cluster.owner(p) == VICTIM]
    sent = len(players) * (UPDATES + 1)

    async def main() -> None:
        clients = [await RingsideClient.connect(cluster.url, cluster.token(p)) for p in players]
        for client in clients:  # closed loop: one request in flight per session
            for _ in range(UPDATES):
                await client.request("player.update", {"incr": {"xp": 1}})
            await client.request("player.get")

        gw = scrape(cluster, "gateway")
        assert value(gw, "ringside_gateway_hellos_total", result="ok") == len(players)
        assert value(gw, "ringside_gateway_sessions") == len(players)
        assert value(gw, "ringside_gateway_requests_total") == sent
        # Every request of a closed-loop client is the one timed.
        assert value(gw, "ringside_gateway_request_seconds_count") == sent
        assert value(gw, "ringside_gateway_request_seconds_sum") > 0
        assert value(gw, "ringside_gateway_members", state="alive") == 4
        assert value(gw, "ringside_gateway_session_moves_total") == 0
        assert sum(v for (n, _), v in gw.items() if n == "ringside_gateway_link_bytes_total") > 0

        ok = lambda op: nodes_total(cluster, "ringside_node_requests_total", op=op, result="ok")  # noqa: E731
        assert ok("player.update") == len(players) * UPDATES
        assert ok("player.get") == len(players)
        assert nodes_total(cluster, "ringside_node_sessions") == len(players)
        assert nodes_total(cluster, "ringside_node_actors_by_kind", kind="player") == len(players)
        assert nodes_total(cluster, "ringside_node_activations_total") == len(players)
        assert nodes_total(cluster, "ringside_node_members", state="alive") == 3 * 4
        await asyncio.to_thread(cluster.wait_flushed)
        assert nodes_total(cluster, "ringside_node_states_written_total") >= len(players)
        assert nodes_total(cluster, "ringside_node_flushes_total") >= 1
        assert nodes_total(cluster, "ringside_node_dirty_actors") == 0
        assert nodes_total(cluster, "ringside_node_redis_errors_total") == 0
        assert nodes_total(cluster, "ringside_node_stale_epoch_total") == 0

        # Failover: SIGKILL the owner of some sessions; each displaced client is served again.
        await asyncio.to_thread(cluster.local.kill, VICTIM)
        for client in clients:
            await asyncio.wait_for(client.request("player.update", {"incr": {"xp": 1}}), 15)
        for client in clients:
            await client.close()

    asyncio.run(main())

    gw = scrape(cluster, "gateway")
    assert value(gw, "ringside_gateway_requests_total") == sent + len(players)
    assert value(gw, "ringside_gateway_request_seconds_count") == sent + len(players)
    moves = value(gw, "ringside_gateway_session_moves_total")
    assert moves >= len(displaced) >= 1
    assert value(gw, "ringside_gateway_move_seconds_count") == moves
    assert value(gw, "ringside_gateway_member_events_total", from_state="suspect", to_state="faulty") >= 1
    wait_until(
        lambda: value(scrape(cluster, "gateway"), "ringside_gateway_members", state="faulty") == 1,
        5,
        "gateway counts the killed node faulty",
    )
    # The survivors activated the displaced players (new epochs) and took their requests.
    assert nodes_total(cluster, "ringside_node_activations_total") >= 8 + len(displaced)
    assert nodes_total(cluster, "ringside_node_requests_total", op="player.update", result="ok") >= (
        8 * UPDATES + len(players)
    )
    code, status = http_json(cluster.local.admin_url("gateway") + "/status")
    assert code == 200 and status["membership"]["members"][VICTIM] == "faulty"
    # Both kinds of process run the collector's policy (decision 28): startup froze their
    # modules, and the pauses are exported.
    for name in ("gateway", "n1"):
        gc_status = http_json(cluster.local.admin_url(name) + "/status")[1]["gc"]
        assert gc_status["freeze"] is True and gc_status["frozen_objects"] > 10_000
        samples = scrape(cluster, name)
        assert value(samples, "ringside_gc_frozen_objects") > 10_000
        assert value(samples, "ringside_gc_pause_seconds_count", generation="0") >= 1


def test_dashboard_page_and_feed_require_the_admin_token(cluster: Cluster) -> None:
    import urllib.error
    import urllib.request

    import orjson
    from websockets.asyncio.client import connect

    base = cluster.local.admin_url("gateway")
    try:
        urllib.request.urlopen(base + "/", timeout=2)
        raise AssertionError("page served without a token")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    with urllib.request.urlopen(f"{base}/?token={cluster.config.admin_token}", timeout=2) as resp:
        assert resp.status == 200 and b"/dashboard/feed" in resp.read()
        assert resp.headers["Referrer-Policy"] == "no-referrer"

    async def feed() -> None:
        ws_url = base.replace("http://", "ws://") + "/dashboard/feed"
        async with connect(ws_url) as ws:
            await ws.send(orjson.dumps({"token": "wrong"}).decode())
            try:
                await asyncio.wait_for(ws.recv(), 2)
                raise AssertionError("feed answered a wrong token")
            except Exception as exc:  # ConnectionClosed with 1008
                assert ws.close_code == 1008, exc
        async with connect(ws_url) as ws:
            await ws.send(orjson.dumps({"token": cluster.config.admin_token}).decode())
            snap = orjson.loads(await asyncio.wait_for(ws.recv(), 3))
            while len([m for m in snap["members"] if m["state"] == "alive"]) < 4:
                snap = orjson.loads(await asyncio.wait_for(ws.recv(), 3))
            assert set(snap["ring"]) == {"n1", "n2", "n3"}
            assert abs(sum(snap["ring"].values()) - 1) < 1e-3
            assert len(snap["sectors"]) == 180
            snap = orjson.loads(await asyncio.wait_for(ws.recv(), 3))
            assert all(snap["nodes"][n]["reachable"] for n in ("n1", "n2", "n3"))

    asyncio.run(feed())


# What a session or an actor is made of: none of it may be left in a reference cycle.
SESSION_TYPES = {
    "GatewayConnection", "ServerProtocol", "StreamReader", "LoggerAdapter", "UUID", "ClientSession",
    "Session", "ClientFrames", "TokenBucket", "PlayerState", "Activation", "NodeSession",
}  # fmt: skip


def test_sessions_frozen_by_the_gc_policy_leave_no_cycles_when_they_end(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Decision 28 freezes live sessions; one that then dies in a reference cycle would be
    kept until the hourly reclaim. Sessions that end cleanly, clients that vanish (aborted
    sockets), take-overs, oversized frames and connections that never finish their
    handshake must free everything by reference counting, and so must the actors, which
    passivate here after a second: a reclaim, which walks and frees every cycle, finds none
    of their objects."""
    cluster = make_cluster(extra="[node]\nidle_timeout_s = 1.0")
    players = [f"gcp{i}" for i in range(40)]
    ended: list[int | None] = []
    host, port = cluster.config.gateway.host, cluster.config.gateway.port

    async def main() -> None:
        clients = [await RingsideClient.connect(cluster.url, cluster.token(p)) for p in players]
        for client in clients:
            await client.request("player.update", {"incr": {"xp": 1}})
        for name in ("gateway", "n1"):  # a reclaim freezes what is live: these sessions
            assert (await asyncio.to_thread(cluster.local.admin, name, "gc"))["ran"]
        newer = [await RingsideClient.connect(cluster.url, cluster.token(p)) for p in players[:4]]
        for client in clients[4:8]:
            await client.ws.send("x" * (cluster.config.gateway.max_frame_bytes + 1))
        for client in clients[:8]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.wait_closed(), 5)
            ended.append(client.ws.close_code)
        for client in [*newer, *clients[8:24]]:
            await client.close()
        for client in clients[24:]:
            client.ws.transport.abort()  # the client vanishes without a close frame
        for request in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /ws HTTP/1.1\r\nHo"):
            reader, writer = await asyncio.open_connection(host, port)  # handshake never done
            writer.write(request)
            await writer.drain()
            if request.endswith(b"\r\n\r\n"):
                await asyncio.wait_for(reader.read(), 5)  # refused: the gateway closes
            writer.close()

    asyncio.run(main())
    assert ended == [CloseCode.SESSION_REPLACED] * 4 + [CloseCode.TOO_BIG] * 4
    cluster.wait_durable()  # the gateway has released every session
    wait_until(lambda: cluster.node_status("n1")["actors"] == 0, 10, "n1's actors passivate")
    for name in ("gateway", "n1"):
        result = cluster.local.admin(name, "gc")
        assert result["ran"]
        left = {kind for kind, _ in result["freed_types"]} & SESSION_TYPES
        # Without the gateway's cycle break an aborted socket left ~13 objects in a cycle.
        assert not left and result["freed"] < len(players), (name, result)
