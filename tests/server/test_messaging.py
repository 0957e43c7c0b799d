"""Game event delivery on one node, with the real runtime, game and write-behind; the
store, the peers and the persister are never reached (every actor is adopted, every
owner is this node, and the test says when a write is durable)."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace
from typing import Any

import orjson

from server.config import NodeSettings
from server.game import Event, GameState
from server.messaging import Messaging
from server.player import PlayerState
from server.ring import HashRing
from server.runtime import ActorRuntime
from server.wire import Frame, Kind
from server.writebehind import WriteBehind


class Never:
    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the {self._what} was called: {name}")


async def until(condition: Any, what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s: {what}"
        await asyncio.sleep(0.005)


def load(key: str, blob: bytes | None) -> Any:
    kind, _, ident = key.partition(":")
    return (
        GameState.from_blob(blob, ident, 16)
        if kind == "game"
        else PlayerState.from_blob(blob, default_name=ident)
    )


def one_node(
    settings: NodeSettings, store: Any = None, membership: Any = None
) -> tuple[Messaging, ActorRuntime, list[tuple[str, int]]]:
    pushed: list[tuple[str, int]] = []  # (actor, event seq) pushed to its sessions
    wb = WriteBehind(
        interval=0.1, batch_max=10, max_dirty=100, retry_base=0.05, retry_cap=1, rng=random.Random(1), now=0
    )
    holder: dict[str, Messaging] = {}
    runtime = ActorRuntime(
        store or Never("store"),
        wb,
        settings,
        clock=lambda: 0.0,
        load=load,
        on_activated=lambda act: holder["m"].on_activated(act),
        on_deactivated=lambda act, stale, moved_to: None,
    )
    messaging = Messaging(
        name="n1",
        settings=settings,
        membership=membership or SimpleNamespace(ring=HashRing(["n1"]), ring_changed_at=float("-inf")),
        peers=Never("peer links"),  # type: ignore[arg-type]
        runtime=runtime,
        write_behind=wb,
        persister=SimpleNamespace(kick=lambda: None),  # type: ignore[arg-type]
        migrator=SimpleNamespace(moved={}, adopted_from={}),  # type: ignore[arg-type]
        push=lambda actor, seq, stream, frame: pushed.append((actor, seq)),
        game_id_key=b"k" * 32,
    )
    holder["m"] = messaging
    return messaging, runtime, pushed


def test_a_quiet_game_sends_its_last_event_again_so_a_lost_push_is_filled():
    """A copy of b's actor on a node whose ring lagged took the game's last event in its
    place: b's actor here never got it, and no later event shows the gap. The game, quiet,
    sends its last event again (twice here), and b's actor fills the gap from the log."""

    async def main() -> None:
        settings = NodeSettings(game_announce_s=0.05, game_announces=2)
        messaging, runtime, pushed = one_node(settings)
        game = GameState("g1", 16)
        game.exists, game.players, game.scores = True, ["a", "b"], {}
        for seq, action in enumerate([{"type": "created"}, {"type": "joined"}], 1):
            game.log.append(Event(seq, "a", action))
        game.seq = 2
        assert runtime.adopt("game:g1", 1, game.to_blob())
        for name in ("a", "b"):
            player = PlayerState(name)
            player.games = {"g1": 2}
            assert runtime.adopt(f"player:{name}", 1, player.to_blob())
        pushed.clear()  # what the game's activation announced

        message = {"to": "game:g1", "op": "game.action", "from": "a", "fseq": 1, "hops": 0}
        reply = asyncio.ensure_future(
            messaging.local(dict(message, args={"action": {"type": "score", "points": 1}}))
        )
        await asyncio.sleep(0)
        game_act = runtime.actors["game:g1"]
        game_act.durable_upto(game_act.version, True)  # the flush wrote the game
        assert orjson.loads(orjson.dumps(await reply))["result"]["seq"] == 3
        await until(lambda: len(pushed) == 2, "the event pushed to both players")
        assert sorted(pushed) == [("player:a", 3), ("player:b", 3)]

        # b's push is lost: its actor here is where it was before the event.
        runtime.actors["player:b"].player.games["g1"] = 2
        pushed.clear()
        await until(lambda: pushed != [], "the first announce, after 0.05 s of quiet")
        await until(lambda: game_act.timer is None, "the second announce, 0.1 s after the first")
        assert pushed == [("player:b", 3)], "b got the event again; a, who had it, got nothing"
        assert runtime.actors["player:b"].player.games["g1"] == 3
        assert game_act.data.announce is None, "announced twice, then done"

    asyncio.run(main())


def a_game(seq: int) -> GameState:
    game = GameState("g1", 16)
    game.exists, game.players, game.scores = True, [], {}
    for n in range(1, seq + 1):
        game.log.append(Event(n, "", {"type": "created"} if n == 1 else {"type": "x"}))
    game.seq = seq
    return game


class OneGameInRedis:
    """What Redis holds for game g1: another node's copy took epoch 4 and wrote up to seq 5."""

    def __init__(self) -> None:
        self.epoch, self.blob, self.asked = 4, a_game(5).to_blob(), 0

    async def current_epoch(self, actor: str) -> int:
        self.asked += 1
        return self.epoch

    async def activate(self, actor: str) -> tuple[int, bytes | None]:
        self.epoch += 1
        return self.epoch, self.blob


def test_a_game_read_soon_after_a_ring_change_is_not_answered_by_a_stale_copy():
    """While a ring change spreads, another node took the game over (a newer epoch) and
    wrote events 3-5, which its players were pushed; our copy, at seq 2, wrote nothing since
    and does not know. Within ring_settle_s a read checks the epoch and loads afresh;
    later a read is answered from memory, with no Redis round trip."""

    async def main() -> None:
        redis = OneGameInRedis()
        membership = SimpleNamespace(ring=HashRing(["n1"]), ring_changed_at=time.monotonic())
        messaging, runtime, _ = one_node(NodeSettings(game_announce_s=0), redis, membership)
        assert runtime.adopt("game:g1", 3, a_game(2).to_blob())
        read = {"to": "game:g1", "op": "game.get", "args": {}, "from": "a", "fseq": 0, "hops": 0}
        reply = await messaging.local(dict(read))
        assert reply["result"]["seq"] == 5, "not the stale copy's seq 2"
        assert redis.asked == 1 and runtime.actors["game:g1"].epoch > 4, "a fresh load, a newer epoch"

        membership.ring_changed_at = time.monotonic() - NodeSettings().ring_settle_s - 1
        redis.epoch += 10  # overtaken again: no read checks it any more
        reply = await messaging.local(dict(read))
        assert reply["result"]["seq"] == 5 and redis.asked == 1

    asyncio.run(main())


def test_a_release_from_a_newer_epoch_drops_the_copy_here_and_wakes_the_game():
    """Another node held game g1 under epoch 4, wrote it and let it go (a hand-off): its
    `actors.released` drops our idle copy from epoch 3, and its wake loads the game afresh
    (its deadlines must keep running). A release from an older epoch changes nothing."""

    async def main() -> None:
        redis = OneGameInRedis()
        messaging, runtime, _ = one_node(NodeSettings(game_announce_s=0), redis)
        assert runtime.adopt("game:g1", 3, a_game(2).to_blob())

        def released(epoch: int) -> Frame:
            args = {"actors": {"game:g1": epoch}, "wake": ["game:g1"]}
            message = {"to": "node", "op": "actors.released", "from": "n2", "args": args}
            return Frame(Kind.ACTOR_SEND, 0, payload=orjson.dumps(message))

        messaging.on_peer_frame(Never("link"), released(2))  # type: ignore[arg-type]
        assert runtime.actors["game:g1"].epoch == 3 and redis.asked == 0, "ours is newer: kept"
        messaging.on_peer_frame(Never("link"), released(4))  # type: ignore[arg-type]
        await until(lambda: runtime.actors["game:g1"].epoch > 3, "the game woken on a fresh load")
        game = runtime.actors["game:g1"]
        assert game.epoch == 5 and game.data.seq == 5, "dropped, then woken from what Redis holds"

    asyncio.run(main())
