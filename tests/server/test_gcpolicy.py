"""The garbage-collector policy in this (pytest's) process: what a full collection leaves
frozen, what a reclaim frees, what is counted. Each test restores CPython's state."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.config import GcSettings
from server.gcpolicy import PAUSE_BUCKETS, GcPolicy


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
    full = p.collections[2]
    result = p.reclaim()
    assert result["ran"] and result["freed"] >= 2
    assert gone() is None
    assert p.reclaims == 1 and p.reclaimed >= 2 and p.longest_reclaim > 0
    assert p.collections[2] == full  # a reclaim is not counted as a full collection
    assert gc.get_freeze_count() > 0  # frozen again


def test_a_census_names_what_a_reclaim_freed_and_frees_it(policy: Callable[..., GcPolicy]) -> None:
    p = policy()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.collect()
    del a, b
    result = p.reclaim(census=True)
    assert ("Node", 2) in result["freed_types"]
    assert gone() is None and not gc.garbage and not gc.get_debug() & gc.DEBUG_SAVEALL


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
    assert p.collections[0] >= before[0] + 1
    assert p.collections[2] >= before[2] + 1
    assert p.longest_pause[2] > 0
    status = p.status()
    assert status["frozen_objects"] == gc.get_freeze_count()
    assert status["collections"][2] == p.collections[2]
    registry = CollectorRegistry()
    registry.register(p)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {
        (x.name, x.labels.get("generation"), x.labels.get("le")): x.value
        for x in families["ringside_gc_pause_seconds"].samples
    }
    for generation in (0, 1, 2):
        g = str(generation)
        count = samples[("ringside_gc_pause_seconds_count", g, None)]
        assert count == p.collections[generation]
        assert samples[("ringside_gc_pause_seconds_bucket", g, "+Inf")] == count
        assert samples[("ringside_gc_pause_seconds_sum", g, None)] == pytest.approx(
            p.pause_seconds[generation]
        )
        rows = [samples[("ringside_gc_pause_seconds_bucket", g, repr(b))] for b in PAUSE_BUCKETS]
        assert rows == sorted(rows) and rows[-1] <= count
        # Each pause falls in the first bucket whose bound is at least it.
        assert rows[-1] == count or p.longest_pause[generation] > PAUSE_BUCKETS[-1]
    frozen = families["ringside_gc_frozen_objects"].samples[0].value
    assert frozen > 1000 and frozen == pytest.approx(gc.get_freeze_count(), rel=0.05)  # it moves as we parse
    assert families["ringside_gc_collected_objects"].samples[0].value == p.collected


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
    for settings in (GcSettings(reclaim_interval_s=0), GcSettings(freeze=False, reclaim_interval_s=0.01)):
        off = GcPolicy(settings)
        asyncio.run(asyncio.wait_for(off.run(), 1))  # returns at once
        assert off.reclaims == 0
