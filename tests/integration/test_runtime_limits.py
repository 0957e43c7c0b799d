"""Idle actors passivate, the activation cap holds, and game timers fire, on real processes."""

from __future__ import annotations

import asyncio

from gateway.client import RingsideClient
from tests.integration.conftest import await_until, wait_until


def test_the_activation_cap_holds_and_evicted_actors_keep_their_state(make_cluster):
    cluster = make_cluster(extra="[node]\nmax_activations = 30\nidle_timeout_s = 300.0")
    players = [f"cap{i}" for i in range(120)]
    peak: dict[str, int] = {}

    async def main():
        for start in range(0, len(players), 10):
            for p in players[start : start + 10]:
                async with await RingsideClient.connect(cluster.url, cluster.token(p)) as c:
                    await c.request("player.update", {"incr": {"xp": 1}})
            for n in cluster.config.node_names:
                peak[n] = max(peak.get(n, 0), cluster.node_status(n)["actors"])
        for p in players:
            async with await RingsideClient.connect(cluster.url, cluster.token(p)) as c:
                assert (await c.request("player.get"))["xp"] == 1, p

    asyncio.run(main())
    assert max(peak.values()) == 30, peak  # the cap was reached and held


def test_idle_actors_passivate(make_cluster):
    cluster = make_cluster(extra="[node]\nidle_timeout_s = 1.0")
    players = [f"idle{i}" for i in range(120)]
    peak: dict[str, int] = {}

    async def touch(batch):
        for p in batch:
            async with await RingsideClient.connect(cluster.url, cluster.token(p)) as c:
                await c.request("player.update", {"incr": {"xp": 1}})

    async def main():
        for start in range(0, len(players), 10):
            await touch(players[start : start + 10])
            for n in cluster.config.node_names:
                peak[n] = max(peak.get(n, 0), cluster.node_status(n)["actors"])

    asyncio.run(main())
    assert sum(peak.values()) > 0
    wait_until(
        lambda: all(cluster.node_status(n)["actors"] == 0 for n in cluster.config.node_names),
        10,
        "idle actors passivate",
    )

    async def read_back():
        for p in players:
            async with await RingsideClient.connect(cluster.url, cluster.token(p)) as c:
                assert (await c.request("player.get"))["xp"] == 1, p

    asyncio.run(read_back())


def test_a_timed_game_ends_and_tells_its_players(cluster):
    async def main():
        async with await RingsideClient.connect(cluster.url, cluster.token("timer")) as c:
            game = (await c.request("game.create", {"max_players": 2, "duration_s": 1}))["game"]
            await c.request("game.action", {"game": game, "action": {"type": "score", "points": 4}})
            seen: list[dict] = []

            def ended() -> bool:
                while not c.events.empty():
                    seen.append(c.events.get_nowait())
                return any(e["data"]["action"]["type"] == "ended" for e in seen)

            await await_until(ended, 10, "the game ends after its duration")
            final = [e for e in seen if e["data"]["action"]["type"] == "ended"][0]["data"]
            assert final["action"]["reason"] == "time"
            assert final["action"]["scores"] == {"timer": 4}
            state = await c.request("game.get", {"game": game})
            assert state["status"] == "ended"
            reply = await c.call("game.action", {"game": game, "action": {"type": "x"}})
            assert reply["error"]["code"] == "game_ended"
            # An ended game holds none of the player's game slots.
            assert (await c.request("player.get"))["games"] == []
            assert (await c.request("game.leave", {"game": game}))["game"] == game

    asyncio.run(main())
