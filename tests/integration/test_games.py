"""Games across nodes on real processes: ordered, gap-free, exactly-once events, also
across the loss of the game's node; a client that stops reading is closed alone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import socket
import time
import urllib.request

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.client import RequestFailed, RingsideClient
from server.ring import HashRing
from tests.integration.conftest import await_until, is_stopped

PLAYERS = [f"q{i}" for i in range(8)]


async def await_until_async(fetch, check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check(await fetch()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def too_slow_closes(cluster) -> int:
    with urllib.request.urlopen(cluster.local.admin_url("gateway") + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith('ringside_gateway_closes_total{code="4004"}'):
            return int(float(line.split()[-1]))
    return 0


def drain_events(client: RingsideClient, into: list[dict]) -> None:
    while not client.events.empty():
        into.append(client.events.get_nowait())


def game_seqs(events: list[dict], game: str) -> list[int]:
    return [e["data"]["seq"] for e in events if e["ev"] == "game.event" and e["data"]["game"] == game]


async def start_game(cluster, players, max_players=None):
    clients = [await RingsideClient.connect(cluster.url, cluster.token(p)) for p in players]
    size = max_players or len(players)
    created = await clients[0].request("game.create", {"mode": "ffa", "max_players": size})
    game = created["game"]
    for c in clients[1:]:
        await c.request("game.join", {"game": game})
    return clients, game


async def play(clients, game, rounds, acked_points, *, pause=0.0):
    async def one(c):
        rng = random.Random(c.player)
        for i in range(rounds):
            if i % 3 == 0:
                action = {"type": "move", "to": [rng.random(), rng.random()]}
            else:
                action = {"type": "score", "points": 1}
            await c.request("game.action", {"game": game, "action": action})
            if action["type"] == "score":
                acked_points[c.player] = acked_points.get(c.player, 0) + 1
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(one(c) for c in clients))


async def check_streams(clients, game, received, timeout=15.0):
    final = (await clients[0].request("game.get", {"game": game}))["seq"]

    def caught_up():
        for c in clients:
            drain_events(c, received[c.player])
        return all(game_seqs(received[c.player], game)[-1:] == [final] for c in clients)

    try:
        await await_until(caught_up, timeout, "every client sees the game's last event")
    except AssertionError as exc:
        seen = {c.player: game_seqs(received[c.player], game)[-3:] for c in clients}
        raise AssertionError(f"{exc}: game.get says {final}; the clients' last: {seen}") from None
    for c in clients:
        seqs = game_seqs(received[c.player], game)
        assert seqs == list(range(seqs[0], final + 1)), f"{c.player}: gap or duplicate in {seqs}"
    return final


def test_eight_players_across_nodes_see_every_action_once_in_order(cluster):
    ring = HashRing(cluster.config.node_names)
    assert len({ring.owner(f"player:{p}") for p in PLAYERS}) >= 2
    acked: dict[str, int] = {}

    async def main():
        clients, game = await start_game(cluster, PLAYERS)
        received = {c.player: [] for c in clients}
        await play(clients, game, 30, acked)
        final = await check_streams(clients, game, received)
        # create + 8 joins + 8 * 30 actions
        assert final == 1 + 8 + 8 * 30
        # Every action reached every player: each saw everything from its own join on.
        for c in clients:
            seqs = game_seqs(received[c.player], game)
            assert len(seqs) == final - seqs[0] + 1
        state = await clients[0].request("game.get", {"game": game})
        assert state["scores"] == acked
        bad = [
            ("game.action", {"game": game, "action": {"type": "x"}, "extra": 1}, "bad_request"),
            ("game.join", {"game": "no such/id"}, "bad_request"),
            ("game.join", {"game": "g0000000000000000"}, "not_found"),
            ("game.create", {"max_players": 0}, "bad_request"),
            ("game.events", {"game": game, "after": -1}, "bad_request"),
        ]
        for op, args, code in bad:
            reply = await clients[1].call(op, args)
            assert reply["error"]["code"] == code, (op, args, reply)
        for c in clients:
            assert c.closed_with is None
            await c.close()

    asyncio.run(main())
    # Every process is on this host: the gateway's links and the nodes' peer links (the
    # game's calls to its players' nodes) go over Unix sockets.
    assert set(cluster.gateway_status()["link_via"].values()) == {"unix"}
    peer_links = [cluster.node_status(n)["peer_links"] for n in cluster.config.node_names]
    assert any(peer_links) and all(set(p.values()) <= {"unix"} for p in peer_links), peer_links


def test_game_survives_the_loss_of_its_node(cluster):
    acked: dict[str, int] = {}

    async def main():
        clients, game = await start_game(cluster, PLAYERS)
        received = {c.player: [] for c in clients}
        victim = HashRing(cluster.config.node_names).owner(f"game:{game}")
        play_task = asyncio.create_task(play(clients, game, 60, acked, pause=0.01))
        await await_until(lambda: sum(acked.values()) >= 40, 15, "the game is under way")
        await asyncio.to_thread(cluster.local.kill, victim)
        await play_task
        survivors = [n for n in cluster.config.node_names if n != victim]
        assert HashRing(survivors).owner(f"game:{game}") != victim
        await check_streams(clients, game, received)
        state = await clients[0].request("game.get", {"game": game})
        assert state["scores"] == acked, "every acknowledged score counted exactly once"
        assert sum(acked.values()) == 8 * 40
        for c in clients:
            assert c.closed_with is None
            await c.close()

    asyncio.run(main())


def test_a_client_that_stops_reading_is_closed_and_others_keep_going(cluster):
    async def main():
        clients, game = await start_game(cluster, PLAYERS[:4], max_players=5)
        # The slow player joins over a socket with a tiny receive buffer, then never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", cluster.config.gateway.port))
        slow = await connect(cluster.url, sock=sock, compression=None, max_queue=1)
        await slow.send(orjson.dumps({"op": "hello", "token": cluster.token("slowpoke")}).decode())
        await slow.recv()
        await slow.send(orjson.dumps({"id": 1, "op": "game.join", "args": {"game": game}}).decode())
        await await_until_async(
            lambda: clients[0].request("game.get", {"game": game}), lambda g: "slowpoke" in g["players"]
        )
        big = {"type": "emote", "pad": "x" * 400}
        received = {c.player: [] for c in clients}
        started = time.monotonic()
        sent = 0
        while not too_slow_closes(cluster) and time.monotonic() - started < 60:
            for _ in range(25):
                await asyncio.gather(
                    *(c.request("game.action", {"game": game, "action": big}) for c in clients)
                )
                sent += len(clients)
            for c in clients:
                drain_events(c, received[c.player])
        assert too_slow_closes(cluster) == 1, f"not closed after {sent} actions"
        # Reading again, the slow client finds its backlog and then the close code.
        try:
            async with asyncio.timeout(10):
                async for _ in slow:
                    pass
        except ConnectionClosed:
            pass
        assert slow.close_code == 4004, (slow.close_code, sent)
        # The others kept going and still get everything, in order.
        await play(clients, game, 5, {})
        await check_streams(clients, game, received)
        for c in clients:
            assert c.closed_with is None
            await c.close()

    asyncio.run(main())


def test_a_sealed_cluster_plays_across_nodes(make_cluster):
    """With gossip keys configured, gossip and node links are sealed with AES-GCM; games
    across nodes work the same. Links here are TCP (`unix_links = false`), as between hosts."""
    key = base64.b64encode(b"k" * 32).decode()
    cluster = make_cluster(extra=f'[cluster]\ngossip_keys = "{key}"\n[node]\nunix_links = false')
    acked: dict[str, int] = {}

    async def main():
        clients, game = await start_game(cluster, PLAYERS[:4])
        received = {c.player: [] for c in clients}
        await play(clients, game, 10, acked)
        await check_streams(clients, game, received)
        assert (await clients[0].request("game.get", {"game": game}))["scores"] == acked
        for c in clients:
            await c.close()

    asyncio.run(main())
    assert cluster.gateway_status()["membership"]["gossip_dropped"] == 0
    assert set(cluster.gateway_status()["link_via"].values()) == {"tcp"}
    peer_links = [cluster.node_status(n)["peer_links"] for n in cluster.config.node_names]
    assert any(peer_links) and all(set(p.values()) <= {"tcp"} for p in peer_links), peer_links


async def time_out_while_redis_stalls(cluster, client, requests, seconds):
    """Each request is answered `timeout` (node.call_timeout_s) while Redis is stopped under
    the game's commit; it is applied once Redis is back."""
    stall = asyncio.create_task(asyncio.to_thread(cluster.local.pause, "redis", seconds))
    await await_until(lambda: is_stopped(cluster, "redis"), 2, "Redis is stopped")
    for op, args in requests:
        with pytest.raises(RequestFailed) as failed:
            await client.request(op, args)
        assert failed.value.code == "timeout", failed.value
    await stall


def test_a_leave_that_timed_out_does_not_hold_a_game_slot(make_cluster):
    """A leave the game applied after the player's call gave up (`timeout`: Redis stalled the
    game's commit) must not leave the game in the player's `games`, where it would hold one of
    its game slots for good: the player's actor takes its own `left` event as the answer (and
    its own `joined` for a join that timed out). A stale entry that gets past that (a lost
    push) goes at the next leave or action, which the game answers `not_in_game`. Before the
    replay fix, 3 runs in 10 failed here: the call's retry at its deadline was answered `ok`
    from the game's memory while the leave was not yet in Redis."""
    cluster = make_cluster(extra="[node]\ncall_timeout_s = 1.0")

    async def main():
        client = await RingsideClient.connect(cluster.url, cluster.token("leaver"))
        game = (await client.request("game.create", {"mode": "ffa", "max_players": 2}))["game"]
        # Its id: an HMAC of (creator, request seq) under a key from the cluster secret, not a
        # plain hash anyone could compute from a player's name to read the game's log.
        seq = (await client.request("player.get"))["applied_seq"]
        mac = hmac.new(cluster.config.game_id_key, f"leaver:{seq}".encode(), hashlib.sha256)
        assert game == f"g{mac.hexdigest()[:16]}"
        await time_out_while_redis_stalls(cluster, client, [("game.leave", {"game": game})], 2.5)

        async def games():
            return (await client.request("player.get"))["games"]

        await await_until_async(games, lambda g: g == [], timeout=10)
        assert (await client.request("game.get", {"game": game}))["players"] == []

        # A join that timed out the same way: its own `joined` makes the player follow the game.
        await time_out_while_redis_stalls(cluster, client, [("game.join", {"game": game})], 2.5)
        await await_until_async(games, lambda g: g == [game], timeout=10)
        await client.request("game.action", {"game": game, "action": {"type": "score", "points": 1}})
        left = (await client.request("game.leave", {"game": game}))["seq"]
        seen: list[dict] = []
        drain_events(client, seen)
        assert seen[-1]["data"] == {"game": game, "seq": left, "from": "leaver", "action": {"type": "left"}}
        await client.close()

        # The stale entry as a lost push would leave it: in the state the actor loads.
        other = await client_game(cluster, "owner2")
        cluster.redis.set(
            "rs:{player:ghost}:state",
            orjson.dumps({"name": "ghost", "games": {other: 0, game: 0}}),
        )
        ghost = await RingsideClient.connect(cluster.url, cluster.token("ghost"))
        assert sorted((await ghost.request("player.get"))["games"]) == sorted([other, game])
        for g in (other, game):
            op, args = ("game.action", {"action": {"type": "x"}}) if g == other else ("game.leave", {})
            with pytest.raises(RequestFailed) as failed:
                await ghost.request(op, {"game": g, **args})
            assert failed.value.code == "not_in_game"
        assert (await ghost.request("player.get"))["games"] == []
        await ghost.close()

    asyncio.run(main())


async def client_game(cluster, player):
    client = await RingsideClient.connect(cluster.url, cluster.token(player))
    game = (await client.request("game.create", {"mode": "ffa", "max_players": 2}))["game"]
    await client.close()
    return game


def test_joins_that_timed_out_do_not_take_the_player_past_its_game_bound(make_cluster):
    """The player follows a game it joined by its own `joined` event only within
    max_games_per_player; past it the client (told `timeout`) finds itself in the game's
    players and leaves."""
    cluster = make_cluster(extra="[node]\ncall_timeout_s = 1.0\nmax_games_per_player = 1")

    async def main():
        games = [await client_game(cluster, f"host{i}") for i in range(2)]
        client = await RingsideClient.connect(cluster.url, cluster.token("joiner"))
        await time_out_while_redis_stalls(cluster, client, [("game.join", {"game": g}) for g in games], 3.0)

        async def in_games():
            views = [await client.request("game.get", {"game": g}) for g in games]
            return [view["game"] for view in views if "joiner" in view["players"]]

        await await_until_async(in_games, lambda joined: len(joined) == 2, timeout=10)
        followed = (await client.request("player.get"))["games"]
        assert len(followed) == 1 and followed[0] in games
        unfollowed = next(g for g in games if g not in followed)
        await client.request("game.leave", {"game": unfollowed})
        assert (await client.request("player.get"))["games"] == followed
        await client.close()

    asyncio.run(main())


def test_actions_after_a_reconnect_are_applied(cluster):
    """A new session numbers its requests from the player's applied_seq, and a game takes an
    effect numbered at or below the last it applied for that player as a replay: a
    game.action that did not move applied_seq made every acknowledged action after a
    reconnect a no-op (found by a chaos soak: scores short of the acknowledged points)."""
    score = {"type": "score", "points": 1}

    async def main():
        client = await RingsideClient.connect(cluster.url, cluster.token("again"))
        game = (await client.request("game.create", {"max_players": 2}))["game"]
        for _ in range(5):
            await client.request("game.action", {"game": game, "action": score})
        await client.close()
        await await_until(lambda: cluster.gateway_status()["sessions"] == 0, 5, "the session is released")
        client = await RingsideClient.connect(cluster.url, cluster.token("again"))
        action = {"game": game, "action": score}
        seqs = [(await client.request("game.action", action))["seq"] for _ in range(3)]
        assert seqs == sorted(set(seqs)), f"each action is an event of its own: {seqs}"
        assert (await client.request("game.get", {"game": game}))["scores"] == {"again": 8}
        await client.close()

    asyncio.run(main())


def test_a_game_action_waits_for_failover_not_for_a_paused_game_node(cluster):
    """The game's node stops (SIGSTOP) mid-game: a player on another node is answered once
    gossip has moved the game (about a second), not when the paused node would have answered
    or its call timed out (the whole pause, up to call_timeout_s: found by a chaos soak)."""
    ring = HashRing(cluster.config.node_names)
    pause_s = 4.0

    async def main():
        for i in range(20):
            player = f"pz{i}"
            client = await RingsideClient.connect(cluster.url, cluster.token(player))
            game = (await client.request("game.create", {"max_players": 2}))["game"]
            if ring.owner(f"game:{game}") != ring.owner(f"player:{player}"):
                break
            await client.close()
        else:
            raise AssertionError("no game away from its creator's node in 20 tries")
        game_node = ring.owner(f"game:{game}")
        paused = asyncio.create_task(asyncio.to_thread(cluster.local.pause, game_node, pause_s))
        await await_until(lambda: is_stopped(cluster, game_node), 2, "the game's node is stopped")
        started = time.monotonic()
        await client.request("game.action", {"game": game, "action": {"type": "score", "points": 1}})
        took = time.monotonic() - started
        await paused
        assert took < pause_s - 1.0, f"answered after {took:.2f}s of a {pause_s}s pause"
        assert (await client.request("game.get", {"game": game}))["scores"] == {player: 1}
        await client.close()

    asyncio.run(main())
