"""The runtime's live-migration states: freeze, hand over, adopt. No Redis is touched:
an adopted actor needs no round trip, and the store is never called here."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from server.config import NodeSettings
from server.errors import ActorMoved, RingsideError
from server.migration import Migrator
from server.player import PlayerState
from server.runtime import Activation, ActorRuntime, ActorState
from server.writebehind import WriteBehind


class NoStore:
    def __getattr__(self, name: str):
        raise AssertionError(f"the store was called: {name}")


def make_runtime(
    deactivated: list[tuple[str, bool, str | None]], **kw: Any
) -> tuple[ActorRuntime, WriteBehind]:
    wb = WriteBehind(
        interval=0.1, batch_max=10, max_dirty=10, retry_base=0.05, retry_cap=1, rng=random.Random(1), now=0
    )
    runtime = ActorRuntime(
        NoStore(),  # type: ignore[arg-type]
        wb,
        NodeSettings(max_activations=3),
        clock=lambda: 0.0,
        load=lambda key, blob: PlayerState.from_blob(blob, default_name=key),
        on_activated=lambda act: None,
        on_deactivated=lambda act, stale, moved_to: deactivated.append((act.key, stale, moved_to)),
        **kw,
    )
    return runtime, wb


def blob(xp: int, seq: int) -> bytes:
    state = PlayerState("p")
    state.xp, state.applied_seq = xp, seq
    return state.to_blob()


def test_adopt_activates_without_the_store_and_refuses_a_second_copy():
    async def main():
        runtime, _ = make_runtime([])
        assert runtime.adopt("player:a", 7, blob(5, 3))
        act = runtime.actors["player:a"]
        assert (act.state, act.epoch, act.player.xp, act.flushed_seq) == (ActorState.ACTIVE, 7, 5, 3)
        assert not runtime.adopt("player:a", 6, blob(1, 1)), "the newer copy here is kept"
        assert not runtime.adopt("player:a", 7, blob(1, 1)), "so is one of the same epoch"
        assert runtime.actors["player:a"] is act and act.player.xp == 5
        ran: list[int] = []
        runtime.attach("player:a", lambda act: ran.append(act.epoch), lambda error: None)
        assert ran == [7], "the first attach of an adopted actor does not ask Redis"
        runtime.adopt("player:b", 1, blob(0, 0))
        runtime.adopt("player:c", 1, blob(0, 0))
        assert not runtime.adopt("player:d", 1, blob(0, 0)), "max_activations holds"

    asyncio.run(main())


def test_a_copy_from_an_older_epoch_gives_way_to_a_newer_one_held_elsewhere():
    """Two nodes each thought they owned an actor for a moment: the copy from the older
    epoch has not written since, so nothing told it it was stale. A hand-over or a release
    under a newer epoch drops it (sessions re-attach); a busy one finds out by its write."""

    async def main():
        deactivated: list[tuple[str, bool, str | None]] = []
        runtime, _ = make_runtime(deactivated)
        runtime.adopt("player:a", 4, blob(1, 1))
        old = runtime.actors["player:a"]
        assert runtime.adopt("player:a", 9, blob(5, 3)), "a hand-over under a newer epoch replaces it"
        new = runtime.actors["player:a"]
        assert old.state is ActorState.DEACTIVATED and (new.epoch, new.player.xp) == (9, 5)
        assert deactivated == [("player:a", True, None)], "dropped as stale: its sessions re-attach"

        assert not runtime.drop_older("player:a", 9) and not runtime.drop_older("player:a", 8)
        assert runtime.drop_older("player:a", 10), "released elsewhere under a newer epoch"
        assert "player:a" not in runtime.actors
        assert not runtime.drop_older("player:missing", 10)

        runtime.adopt("player:b", 2, blob(0, 0))
        gate = asyncio.get_running_loop().create_future()
        runtime.deliver("player:b", lambda act: gate, lambda error: None)
        assert not runtime.drop_older("player:b", 5), "a busy copy is left to its own write"
        gate.set_result(None)
        await asyncio.sleep(0)
        assert runtime.drop_older("player:b", 5)

    asyncio.run(main())


def test_a_frozen_actor_queues_messages_and_hands_them_to_its_new_owner():
    async def main():
        deactivated: list[tuple[str, bool, str | None]] = []
        runtime, wb = make_runtime(deactivated)
        runtime.adopt("player:a", 3, blob(1, 1))
        wb.mark_dirty("player:a")
        durable: list[bool] = []
        runtime.actors["player:a"].wait_durable(durable.append)
        [frozen] = runtime.freeze(["player:a", "player:missing"])
        assert frozen.state is ActorState.MIGRATING
        ran: list[Activation] = []
        failed: list[RingsideError] = []
        runtime.deliver("player:a", ran.append, failed.append)
        assert ran == [] and len(frozen.pending) == 1, "a message for a frozen actor waits"
        runtime.drop_stale("player:a")
        assert frozen.state is ActorState.MIGRATING, "a refused flush does not undo a migration"
        runtime.migrated(frozen, "n3")
        assert "player:a" not in runtime.actors and not wb.is_dirty("player:a")
        assert durable == [True], "the hand-over wrote the state: group commits complete"
        assert len(failed) == 1 and isinstance(failed[0], ActorMoved) and failed[0].node == "n3"
        assert failed[0].code == "unavailable"
        assert deactivated == [("player:a", False, "n3")]

    asyncio.run(main())


def test_thaw_runs_the_waiting_messages_here_and_a_fenced_one_is_dropped():
    async def main():
        deactivated: list[tuple[str, bool, str | None]] = []
        runtime, _ = make_runtime(deactivated)
        runtime.adopt("player:a", 3, blob(1, 1))
        runtime.adopt("player:b", 3, blob(1, 1))
        a, b = runtime.freeze(["player:a", "player:b"])
        ran: list[str] = []
        runtime.deliver("player:a", lambda act: ran.append(act.key), lambda error: None)
        runtime.thaw(a)
        assert a.state is ActorState.ACTIVE and ran == ["player:a"]
        failed: list[RingsideError] = []
        runtime.deliver("player:b", lambda act: ran.append(act.key), failed.append)
        runtime.fenced(b)
        assert "player:b" not in runtime.actors and ran == ["player:a"]
        assert isinstance(failed[0], ActorMoved) and failed[0].node is None
        assert deactivated == [("player:b", True, None)]

    asyncio.run(main())


def test_a_busy_actor_is_not_frozen():
    async def main():
        runtime, _ = make_runtime([])
        runtime.adopt("player:a", 3, blob(1, 1))
        gate = asyncio.get_running_loop().create_future()
        runtime.deliver("player:a", lambda act: gate, lambda error: None)
        assert runtime.freeze(["player:a"]) == []
        gate.set_result(None)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(runtime.freeze(["player:a"])) == 1

    asyncio.run(main())


@pytest.mark.parametrize("entries", [None, "x", [["k"]], [[1, 2, "x"]], [["player:a", "1", "{}"]]])
def test_migrator_adopt_skips_malformed_entries(entries):
    async def main():
        runtime, wb = make_runtime([])
        migrator = Migrator(
            name="n1",
            settings=NodeSettings(),
            runtime=runtime,
            store=NoStore(),
            write_behind=wb,
            peers=None,  # type: ignore[arg-type]
            link_address=("127.0.0.1", 1),
        )
        assert migrator.adopt(entries, "n2") == 0
        assert migrator.adopt([["player:a", 4, blob(2, 2).decode()]], "n2") == 1
        assert migrator.is_adopted("player:a")
        migrator.on_ring_change(("n1", "n3"), None)
        assert not migrator.is_adopted("player:a"), "its sender left the ring"

    asyncio.run(main())


class HeldStore:
    """`activate` records the ask and answers once released: an activation caught reading
    from Redis, or, if `asked` stays empty, one that never asked."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: list[str] = []

    async def activate(self, key: str) -> tuple[int, bytes]:
        self.asked.append(key)
        await self.release.wait()
        return 9, blob(1, 1)


async def until(condition, message: str) -> None:
    """A few loop iterations are all these steps take; a hang fails instead of stalling."""
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0)
    assert condition(), message


def held_runtime(**kw) -> tuple[ActorRuntime, HeldStore]:
    runtime, _ = make_runtime([], **kw)
    store = HeldStore()
    runtime._store = store  # type: ignore[assignment]
    return runtime, store


def test_a_hand_over_completes_an_activation_that_has_not_asked_redis_yet():
    """A session's attach begins the activation; its old owner's hand-over arrives before the
    activation's task first runs (both read in one wake-up of a busy node): the hand-over
    is the state, and Redis is never asked."""

    async def main():
        runtime, store = held_runtime()
        ran: list[tuple[int, int]] = []
        runtime.attach("player:a", lambda act: ran.append((act.epoch, act.player.xp)), lambda error: None)
        assert runtime.actors["player:a"].state is ActorState.ACTIVATING
        assert runtime.adopt("player:a", 7, blob(5, 3))
        assert ran == [(7, 5)]
        for _ in range(5):  # the activation's task runs now, and must not ask Redis
            await asyncio.sleep(0)
        assert store.asked == [] and runtime.actors["player:a"].epoch == 7 and ran == [(7, 5)]

    asyncio.run(main())


def test_a_hand_over_completes_an_activation_that_is_pulling():
    """Just after joining, an activation asks the key's previous owner first; the state it
    hands over completes the activation, and Redis is never asked."""

    async def main():
        pulls: list[tuple[str, str]] = []
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def pull(source: str, key: str) -> asyncio.Future[None]:
            pulls.append((source, key))
            return answer

        runtime, store = held_runtime(handover_source=lambda key: "n2", pull=pull)
        ran: list[int] = []
        runtime.attach("player:a", lambda act: ran.append(act.epoch), lambda error: None)
        await until(lambda: pulls == [("n2", "player:a")], "it asks the previous owner")
        assert runtime.adopt("player:a", 7, blob(5, 3))
        answer.set_result(None)  # the previous owner answers once it has handed over
        for _ in range(5):
            await asyncio.sleep(0)
        assert ran == [7] and store.asked == []

    asyncio.run(main())


def test_a_hand_over_is_refused_while_the_activation_reads_redis():
    """The read takes a newer epoch than the hand-over's: taking the hand-over would leave
    an actor whose writes are all fenced."""

    async def main():
        runtime, store = held_runtime()
        ran: list[int] = []
        runtime.attach("player:a", lambda act: ran.append(act.epoch), lambda error: None)
        await until(lambda: store.asked == ["player:a"], "it reads Redis")
        assert not runtime.adopt("player:a", 8, blob(5, 3))
        store.release.set()
        await until(lambda: bool(ran), "the read completes the activation")
        assert ran == [9] and runtime.actors["player:a"].player.xp == 1

    asyncio.run(main())


def test_a_stale_hand_over_is_refused_by_an_activation_in_progress_too():
    async def main():
        runtime, store = held_runtime()
        runtime.adopt("player:a", 5, blob(9, 9))  # we held epoch 5
        assert runtime.passivate("player:a")
        runtime.attach("player:a", lambda act: None, lambda error: None)
        assert runtime.actors["player:a"].state is ActorState.ACTIVATING
        assert not runtime.adopt("player:a", 4, blob(1, 1)), "taken at epoch 4: stale"
        await until(lambda: store.asked == ["player:a"], "the activation goes on to Redis")

    asyncio.run(main())


def test_a_hand_over_older_than_an_epoch_held_here_since_is_refused():
    async def main():
        deactivated: list[tuple[str, bool, str | None]] = []
        runtime, _ = make_runtime(deactivated)
        runtime.adopt("player:a", 5, blob(9, 9))  # we held epoch 5 (loaded ourselves, say)
        assert runtime.passivate("player:a")
        assert not runtime.adopt("player:a", 4, blob(1, 1)), "a hand-over taken at epoch 4 is stale"
        assert runtime.adopt("player:a", 6, blob(10, 10)), "a newer one is taken"

    asyncio.run(main())


def test_an_answer_that_changes_nothing_waits_for_the_changes_before_it():
    """A game answers a replay of an effect (or a read) at once only when nothing is on its
    way to Redis; otherwise with the change before it, and refused with it."""
    act = Activation("game:g", 0.0)
    answered: list[tuple[str, bool]] = []
    act.when_durable(lambda ok: answered.append(("idle read", ok)))
    assert answered == [("idle read", True)]

    act.wait_durable(lambda ok: answered.append(("leave", ok)))  # the original, being written
    written = act.version  # what the flush in flight carries
    act.when_durable(lambda ok: answered.append(("replay", ok)))
    assert answered == [("idle read", True)]
    act.wait_durable(lambda ok: answered.append(("next action", ok)))
    act.durable_upto(written, True)
    assert answered[1:] == [("leave", True), ("replay", True)]
    act.when_durable(lambda ok: answered.append(("read", ok)))
    act.durable_upto(act.version, False)  # fenced: that change never reached Redis
    assert answered[3:] == [("next action", False), ("read", False)]
