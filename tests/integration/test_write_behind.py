"""Acknowledged updates reach Redis: concurrent clients, full restart, Redis outage, epoch races."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import subprocess
import time
import urllib.request

from gateway.client import RingsideClient
from server.cluster import http_json
from server.store import Store, Write
from server.wire import HEADER, FrameDecoder, Kind, encode
from tests.integration.conftest import await_until, wait_until


async def increment(client: RingsideClient, count: int, acked: dict[str, int]) -> None:
    for _ in range(count):
        await client.request("player.update", {"incr": {"xp": 1}})
        acked[client.player] = acked.get(client.player, 0) + 1


async def open_link(cluster, node: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder]:
    """A raw node link, authenticated as the gateway's would be."""
    address = cluster.config.node_address(node)
    reader, writer = await asyncio.open_connection(address.host, address.link_port)
    decoder = FrameDecoder()
    [challenge] = decoder.feed(await reader.readexactly(HEADER.size + 16))
    proof = hmac.new(cluster.config.link_key, b"ringside-link\0" + challenge.payload, hashlib.sha256)
    writer.write(encode(Kind.LINK_PROOF, 0, payload=proof.digest()))
    return reader, writer, decoder


async def steal_epoch(cluster, node: str, player: str) -> None:
    """Activate `player` on `node` over a raw, authenticated node link: a second
    activation with a newer epoch, as a node with a stale view would make."""
    reader, writer, decoder = await open_link(cluster, node)
    writer.write(encode(Kind.ATTACH, 999, payload=player.encode()))
    frames = []
    while not frames:
        frames = decoder.feed(await reader.read(65536))
    assert frames[0].kind is Kind.ATTACHED
    writer.close()


def test_hundred_clients_every_acknowledged_increment_lands(cluster):
    players = [f"p{i}" for i in range(100)]
    acked: dict[str, int] = {}

    async def main():
        clients = await asyncio.gather(
            *(RingsideClient.connect(cluster.url, cluster.token(p)) for p in players)
        )
        await asyncio.gather(*(increment(c, 20, acked) for c in clients))
        for c in clients:
            assert c.closed_with is None
        await asyncio.gather(*(c.close() for c in clients))

    asyncio.run(main())
    cluster.wait_flushed()
    assert sum(acked.values()) == 2000
    for p in players:
        state = cluster.stored_state(p)
        assert state["xp"] == acked[p], p
        assert state["applied_seq"] >= acked[p]
    # The actors really are spread over the nodes by the ring.
    per_node = {n: cluster.node_status(n)["actors"] for n in cluster.config.node_names}
    assert all(count > 10 for count in per_node.values()), per_node


def test_full_stop_and_start_keeps_state(cluster):
    async def write():
        async with await RingsideClient.connect(cluster.url, cluster.token("alice")) as c:
            await c.request(
                "player.update",
                {"set": {"name": "Alice", "inventory": ["sword"], "position": [1, 2, 3]}},
            )
            for _ in range(7):
                await c.request("player.update", {"incr": {"xp": 3}})

    asyncio.run(write())
    # No wait for a flush: SIGTERM must make each node flush before it exits.
    cluster.local.down()
    cluster.local.up()

    async def read():
        async with await RingsideClient.connect(cluster.url, cluster.token("alice")) as c:
            return await c.request("player.get")

    state = asyncio.run(read())
    assert state["xp"] == 21
    assert state["name"] == "Alice"
    assert state["inventory"] == ["sword"]
    assert state["position"] == [1, 2, 3]


def test_redis_outage_loses_nothing_acknowledged(cluster):
    players = [f"r{i}" for i in range(20)]
    acked: dict[str, int] = {}
    degraded_seen: list[str] = []

    async def main():
        clients = await asyncio.gather(
            *(RingsideClient.connect(cluster.url, cluster.token(p)) for p in players)
        )
        stop = asyncio.Event()

        async def hammer(c):
            while not stop.is_set():
                await c.request("player.update", {"incr": {"xp": 1}})
                acked[c.player] = acked.get(c.player, 0) + 1

        tasks = [asyncio.create_task(hammer(c)) for c in clients]
        await await_until(lambda: sum(acked.values()) > 200, 10, "serving before the outage")
        await asyncio.to_thread(cluster.local.stop, "redis")
        outage_start = sum(acked.values())

        def any_degraded_now() -> bool:
            return any(
                http_json(cluster.local.admin_url(n) + "/healthz")[0] == 503
                for n in cluster.config.node_names
            )

        def any_degraded() -> bool:
            for n in cluster.config.node_names:
                code, _ = http_json(cluster.local.admin_url(n) + "/healthz")
                if code == 503:
                    degraded_seen.append(n)
            return bool(degraded_seen)

        await await_until(lambda: sum(acked.values()) > outage_start + 200, 10, "serving during outage")
        await asyncio.to_thread(wait_until, any_degraded, 10, "a node reports degraded health")
        await asyncio.to_thread(cluster.local.start_redis)
        await asyncio.to_thread(wait_until, lambda: not any_degraded_now(), 15, "flushes resume")
        stop.set()
        await asyncio.gather(*tasks)
        for c in clients:
            assert c.closed_with is None
        await asyncio.gather(*(c.close() for c in clients))

    asyncio.run(main())
    cluster.wait_flushed(timeout=20)
    assert degraded_seen
    for p in players:
        assert cluster.stored_state(p)["xp"] == acked[p], p


def test_stale_epoch_write_is_refused_in_redis(cluster):
    async def main():
        store = Store(cluster.config.redis.effective_url)
        try:
            old_epoch, _ = await store.activate("player:race")
            new_epoch, _ = await store.activate("player:race")
            assert new_epoch > old_epoch
            assert await store.write_batch([Write("player:race", new_epoch, b'{"xp": 2}')]) == [True]
            assert await store.write_batch([Write("player:race", old_epoch, b'{"xp": 1}')]) == [False]
            assert await store.load("player:race") == b'{"xp": 2}'
            # Live migration: write and take the next epoch in one step; the old owner is
            # fenced off by it, and a hand-over with a stale epoch changes nothing.
            handed = await store.hand_over(
                [Write("player:race", new_epoch, b'{"xp": 3}'), Write("player:race", old_epoch, b'{"xp": 9}')]
            )
            assert handed == [new_epoch + 1, 0]
            assert await store.load("player:race") == b'{"xp": 3}'
            assert await store.write_batch([Write("player:race", new_epoch, b'{"xp": 4}')]) == [False]
            # An empty blob (a clean state) moves only the epoch.
            assert await store.hand_over([Write("player:race", new_epoch + 1, b"")]) == [new_epoch + 2]
            assert await store.load("player:race") == b'{"xp": 3}'
            assert await store.current_epoch("player:race") == new_epoch + 2
        finally:
            await store.close()

    asyncio.run(main())


def test_second_activation_fences_the_first_and_nothing_acknowledged_is_lost(cluster):
    """Another node activates alice (as a node with a stale view would): the owner's next
    write is refused, it drops its activation, the gateway re-attaches and replays."""
    player = "alice"
    owner = cluster.owner(player)
    other = next(n for n in cluster.config.node_names if n != owner)
    acked: dict[str, int] = {}

    async def main():
        async with await RingsideClient.connect(cluster.url, cluster.token(player)) as c:
            await increment(c, 50, acked)
            await steal_epoch(cluster, other, player)
            await increment(c, 200, acked)
            assert c.closed_with is None

    asyncio.run(main())
    # Not wait_flushed alone: if the fence comes after the last "ok", the gateway replays
    # after the client left, and no node is dirty until the replay reaches the new activation.
    cluster.wait_durable()
    assert cluster.node_status(owner)["stale_epoch_refusals"] >= 1
    assert cluster.stored_state(player)["xp"] == acked[player] == 250


def test_a_fence_inside_the_pull_window_loses_nothing(make_cluster):
    """Pulls on, the epoch stolen by the very node the owner pulls from. After the fence the
    owner's new activation asks the thief for alice (it holds her live under the newer
    epoch) before the gateway's replay can reach it; meanwhile no node holds alice dirty and
    Redis lacks the acknowledged updates: only the gateway's replay buffer has them. The thief
    is stopped (SIGSTOP) to hold that window open; the updates must all land after it."""
    cluster = make_cluster(
        extra=(
            "[node]\nmigration_pull_s = 120\nmigration_pull_timeout_s = 10\nflush_interval_ms = 2000\n"
            "stall_drop_s = 30\n[swim]\nsuspicion_min = 30\nsuspicion_max = 60"
        )
    )
    player = "alice"
    owner = cluster.owner(player)
    # The node `owner` pulls alice from: her owner in the ring without `owner`.
    thief = cluster.owner(player, [n for n in cluster.config.node_names if n != owner])
    third = next(n for n in cluster.config.node_names if n not in (owner, thief))
    pid = cluster.local.pid(thief)
    assert pid is not None

    async def main():
        c = await RingsideClient.connect(cluster.url, cluster.token(player))
        await c.request("player.update", {"incr": {"xp": 1}})
        # The owner flushes once a period (2 s), from a phase unknown here. A flush between
        # the last update and the steal would leave it clean when fenced: its next flush
        # would write nothing, be refused nothing, and the fence would never come. Once the
        # first update is in Redis, the next flush is a whole period away.
        await asyncio.to_thread(wait_until, lambda: cluster.stored_xp(player) == 1, 5, "the first flush")
        for _ in range(49):
            await c.request("player.update", {"incr": {"xp": 1}})
        await c.close()  # the gateway keeps what is not durable yet
        await steal_epoch(cluster, thief, player)

    asyncio.run(main())
    # Else the owner flushed everything before the steal, and the window is not under test.
    assert cluster.stored_xp(player) < 50, "the owner flushed the last updates before the steal"
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.node_status(owner)["stale_epoch_refusals"] >= 1, 10, "the fence")
        # The window: what `wait_flushed` alone took for "everything is in Redis".
        assert cluster.node_status(owner)["dirty"] == 0
        assert cluster.node_status(third)["dirty"] == 0
        assert cluster.gateway_status()["sessions"] == 1
        assert cluster.stored_xp(player) < 50
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait_durable()
    assert cluster.node_status(owner)["adopted"] >= 1  # pulled from the thief, not loaded
    assert cluster.stored_state(player)["xp"] == 50


def test_a_session_detached_while_its_actor_activates_does_not_break_a_drain(make_cluster):
    """The gateway may detach a session (it moved on) before the actor it attached to has
    finished activating. The node must not then join the gone session to the actor: a
    drain would wait for that session to leave, then trip over it and never exit."""
    cluster = make_cluster(extra='[node]\nhandoff = "redis"\ndrain_timeout_s = 3.0')
    node = cluster.owner("ghost")
    pid = cluster.local.pid(node)

    async def attach_and_detach():
        reader, writer, decoder = await open_link(cluster, node)
        cluster.redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # the activation waits
        writer.write(encode(Kind.ATTACH, 4242, payload=b"ghost"))
        writer.write(encode(Kind.DETACH, 4242))
        await writer.drain()
        writer.close()

    asyncio.run(attach_and_detach())
    cluster.redis.ping()  # answered once the pause is over

    def activations() -> float:
        with urllib.request.urlopen(cluster.local.admin_url(node) + "/metrics", timeout=2) as resp:
            body = resp.read().decode()
        line = next(x for x in body.splitlines() if x.startswith("ringside_node_activations_total "))
        return float(line.split()[1])

    wait_until(lambda: activations() >= 1, 10, "ghost activated after the pause")
    assert cluster.node_status(node)["sessions"] == 0
    cluster.local.drain(node)
    assert not os.path.exists(f"/proc/{pid}"), "the drained node exited"


def test_make_token_prints_one_token_per_player(cluster):
    out = subprocess.run(
        [".venv/bin/ringside", "--config", str(cluster.config_path), "token", "a", "b", "c"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == 3
    from server.tokens import verify

    assert [verify(cluster.config.secret_bytes, t, now=0).player for t in out] == ["a", "b", "c"]


def test_make_kill_is_a_sigkill_seen_by_status(cluster):
    log_size = (cluster.local.log_file("n2")).stat().st_size
    subprocess.run(
        [".venv/bin/ringside", "--config", str(cluster.config_path), "kill", "n2"],
        check=True,
        capture_output=True,
    )
    rows = {r["name"]: r for r in cluster.local.status()}
    assert not rows["n2"]["running"] and rows["n1"]["healthy"]
    # No graceful stop ran: a SIGTERM would have logged "node stopping".
    tail = cluster.local.log_file("n2").read_bytes()[log_size:]
    assert b"node stopping" not in tail


def test_an_unauthenticated_link_cannot_attach_a_player(cluster):
    """Node link ports are not for clients: without the link key's proof nothing is acted on."""

    async def main():
        address = cluster.config.node_address("n1")
        reader, writer = await asyncio.open_connection(address.host, address.link_port)
        decoder = FrameDecoder()
        [challenge] = decoder.feed(await reader.readexactly(HEADER.size + 16))
        assert challenge.kind is Kind.LINK_CHALLENGE
        writer.write(encode(Kind.LINK_PROOF, 0, payload=b"\0" * 32))  # a guess
        writer.write(encode(Kind.ATTACH, 7, payload=b"victim"))
        try:
            rest = await asyncio.wait_for(reader.read(), 5)  # until the node cuts the link
        except ConnectionResetError:
            rest = b""
        assert decoder.feed(rest) == []  # no ATTACHED, nothing
        writer.close()

    asyncio.run(main())
    status = cluster.node_status("n1")
    assert status["actors"] == 0
    assert status["link_auth_failures"] == 1  # counted, as well as refused


def test_acknowledged_updates_survive_a_fence_after_the_client_left(make_cluster):
    """The client leaves right after its last "ok"; only then is its owner's activation
    fenced off (its next write refused). The gateway kept the requests that were not yet
    durable and replays them to a fresh activation."""
    cluster = make_cluster(extra="[node]\nflush_interval_ms = 1000")
    player = "leaver"
    owner = cluster.owner(player)
    other = next(n for n in cluster.config.node_names if n != owner)

    async def main():
        c = await RingsideClient.connect(cluster.url, cluster.token(player))
        for _ in range(20):
            await c.request("player.update", {"incr": {"xp": 1}})
        await steal_epoch(cluster, other, player)
        for _ in range(30):
            await c.request("player.update", {"incr": {"xp": 1}})
        await c.close()  # before the owner's next flush (1 s) is refused

    asyncio.run(main())
    wait_until(lambda: cluster.node_status(owner)["stale_epoch_refusals"] >= 1, 10, "the fence")
    wait_until(lambda: cluster.gateway_status()["sessions"] == 0, 10, "the session is released")
    cluster.wait_flushed()
    assert cluster.stored_state(player)["xp"] == 50


def test_stopping_while_redis_is_away_says_what_was_not_written(make_cluster):
    """Redis down at `make down`: each node retries for `stop_flush_timeout_s`, then exits
    and says so; `down` does not claim `flushed` for it."""
    cluster = make_cluster(extra="[node]\nflush_interval_ms = 60000\nstop_flush_timeout_s = 1.0")

    async def update() -> None:
        async with await RingsideClient.connect(cluster.url, cluster.token("late")) as client:
            await client.request("player.update", {"incr": {"xp": 1}})

    asyncio.run(update())
    owner = cluster.owner("late")
    cluster.local.stop("redis")
    said: list[str] = []
    cluster.local.progress = said.append
    started = time.monotonic()
    cluster.local.down()
    assert time.monotonic() - started < 15  # the nodes gave up after ~1 s, not the stop timeout
    assert any(line.startswith(f"  {owner} stopped WITHOUT writing 1 actors") for line in said), said
    assert all("WITHOUT" not in line for line in said if not line.startswith(f"  {owner} ")), said
