"""The garbage-collector policy in this (pytest's) process: what a full collection leaves
frozen, what a reclaim frees, what is counted. Each test restores CPython's state."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.config import GcSettings
from server.gcpolicy import GcPolicy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def policy() -> Iterator[Callable[..., GcPolicy]]:
    made: list[GcPolicy] = []

    def make(**kw: object) -> GcPolicy:
        p = GcPolicy(GcSettings(**kw))  # type: ignore[arg-type]
        p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    gc.unfreeze()
    gc.collect()


def tracked(obj: object) -> bool:
    """In a generation a collection walks (gc.get_objects() leaves out the frozen ones)."""
    return any(o is obj for o in gc.get_objects())


def test_a_full_collection_freezes_what_survives_it(policy: Callable[..., GcPolicy]) -> None:
    policy()
    assert gc.get_freeze_count() > 0  # what was live at start
    kept = [Node() for _ in range(1000)]
    assert tracked(kept[0])
    gc.collect()
    assert not tracked(kept[0]) and not tracked(kept)
    assert gc.get_freeze_count() >= len(kept)


def test_without_freeze_the_survivors_stay_where_collections_walk(policy: Callable[..., GcPolicy]) -> None:
    policy(freeze=False)
    assert gc.get_freeze_count() == 0
    kept = [Node() for _ in range(10)]
    gc.collect()
    assert tracked(kept[0])


def test_a_reclaim_frees_a_cycle_that_died_frozen(policy: Callable[..., GcPolicy]) -> None:
    p = policy()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.collect()  # both live: frozen
    del a, b
    gc.collect()
    assert gone() is not None  # a frozen cycle outlives ordinary collections
    assert p.reclaim() >= 2
    assert gone() is None
    assert p.reclaims == 1 and p.reclaimed >= 2
    assert gc.get_freeze_count() > 0  # frozen again


def test_young_garbage_cycles_are_still_collected(policy: Callable[..., GcPolicy]) -> None:
    p = policy()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect(0)
    assert gone() is None
    assert p.collected >= 2


def test_collections_and_pauses_are_counted_and_exported(policy: Callable[..., GcPolicy]) -> None:
    p = policy()
    before = list(p.collections)
    gc.collect(0)
    gc.collect()
    assert p.collections[0] == before[0] + 1
    assert p.collections[2] == before[2] + 1
    assert p.longest_pause[2] > 0
    status = p.status()
    assert status["frozen_objects"] == gc.get_freeze_count()
    assert status["collections"][2] == p.collections[2]
    registry = CollectorRegistry()
    registry.register(p)
    text = generate_latest(registry).decode()
    assert f'ringside_gc_pause_seconds_count{{generation="2"}} {float(p.collections[2])}' in text
    assert "ringside_gc_frozen_objects" in text


def test_close_stops_the_counting(policy: Callable[..., GcPolicy]) -> None:
    p = policy()
    p.close()
    seen = list(p.collections)
    gc.collect()
    assert p.collections == seen


def test_run_reclaims_on_its_interval_and_not_when_off(policy: Callable[..., GcPolicy]) -> None:
    on = policy(reclaim_interval_s=0.01)

    async def briefly(p: GcPolicy) -> None:
        task = asyncio.create_task(p.run())
        deadline = asyncio.get_running_loop().time() + 5
        while p.reclaims < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(briefly(on))
    assert on.reclaims >= 2
    off = GcPolicy(GcSettings(reclaim_interval_s=0))
    asyncio.run(asyncio.wait_for(off.run(), 1))  # returns at once
    assert off.reclaims == 0
