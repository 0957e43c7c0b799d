import random

import pytest

from server.writebehind import DirtySetFull, WriteBehind


def make(now=0.0, **kw):
    opts = dict(interval=0.1, batch_max=100, max_dirty=1000, retry_base=0.05, retry_cap=2.0)
    opts.update(kw)
    return WriteBehind(rng=random.Random(1), now=now, **opts)


def test_many_updates_coalesce_into_one_write_per_actor():
    wb = make()
    for i in range(1000):
        wb.mark_dirty(f"player:{i % 10}")
    assert wb.take_batch(0.05) == []  # not due yet
    batch = wb.take_batch(0.1)
    assert sorted(batch) == sorted(f"player:{i}" for i in range(10))
    wb.flushed(batch)
    assert len(wb) == 0
    assert wb.take_batch(10.0) == []


def test_batches_are_bounded_and_drain_in_one_period():
    wb = make(batch_max=30)
    for i in range(100):
        wb.mark_dirty(i)
    sizes = []
    while batch := wb.take_batch(0.1):
        sizes.append(len(batch))
        wb.flushed(batch)
    assert sizes == [30, 30, 30, 10]


def test_dirty_again_during_flush_is_written_again():
    wb = make()
    wb.mark_dirty("a")
    batch = wb.take_batch(0.1)
    wb.mark_dirty("a")  # updated while its write is in flight
    assert wb.take_batch(0.2) == []  # never two writes of one key at once
    wb.flushed(batch)
    assert wb.take_batch(0.2) == ["a"]


def test_failure_keeps_state_and_backs_off_with_jitter():
    wb = make()
    wb.mark_dirty("a")
    batch = wb.take_batch(0.1)
    delays = []
    now = 0.1
    for _ in range(8):
        delay = wb.failed(batch, now)
        delays.append(delay)
        assert wb.is_dirty("a") and wb.degraded
        assert wb.take_batch(now) == []  # waits for the backoff
        now = wb.next_flush
        batch = wb.take_batch(now)
        assert batch == ["a"]
    assert all(0 <= d <= 2.0 for d in delays)
    assert max(delays) > 0.1  # backoff grows
    wb.flushed(batch)
    assert not wb.degraded and len(wb) == 0


def test_bound_refuses_new_actors_but_not_dirty_ones():
    wb = make(max_dirty=2)
    wb.mark_dirty("a")
    wb.mark_dirty("b")
    assert not wb.can_accept("c")
    with pytest.raises(DirtySetFull):
        wb.mark_dirty("c")
    wb.mark_dirty("a")  # already dirty: fine
    assert wb.can_accept("a")


def test_discard_forgets():
    wb = make()
    wb.mark_dirty("a")
    wb.discard("a")
    assert len(wb) == 0 and wb.take_batch(1.0) == []


def test_urgent_write_does_not_wait_for_the_period():
    wb = make()
    wb.mark_dirty("game:g1", urgent=True)
    assert wb.take_batch(0.0) == ["game:g1"]  # group commit: now, not at 0.1


def test_urgent_write_still_backs_off_while_redis_fails():
    wb = make()
    wb.mark_dirty("a")
    batch = wb.take_batch(0.1)
    wb.failed(batch, 0.1)
    wb.mark_dirty("b", urgent=True)
    assert wb.take_batch(0.1) == []


def test_count_and_dirtiness_follow_a_model_through_random_interleavings():
    """`len()` and `is_dirty()` are kept incrementally; a model recomputes them."""
    rng = random.Random(7)
    wb = make(batch_max=5, max_dirty=10_000)
    dirty: set[int] = set()  # changed since its last write began
    in_flight: dict[int, list[int]] = {}  # batch id -> keys
    now = 0.0
    for step in range(5000):
        now += 0.01
        action = rng.random()
        if action < 0.5:
            key = rng.randrange(30)
            wb.mark_dirty(key)
            dirty.add(key)
        elif action < 0.7:
            batch = wb.take_batch(now)
            assert not set(batch) & {k for keys in in_flight.values() for k in keys}
            dirty -= set(batch)
            in_flight[step] = batch
        elif action < 0.75:  # its actor is dropped (stale, migrated), maybe mid-write
            key = rng.randrange(30)
            wb.discard(key)
            dirty.discard(key)  # a write under way stays in flight until it returns
        elif in_flight:
            batch_id = rng.choice(list(in_flight))
            keys = in_flight.pop(batch_id)
            if rng.random() < 0.2:  # the persister finds no activation to write for some
                skipped = [k for k in keys if rng.random() < 0.3]
                for key in skipped:
                    wb.skipped(key)
                    dirty.discard(key)
                keys = [k for k in keys if k not in skipped]
            if rng.random() < 0.8:
                wb.flushed(keys)
            else:
                wb.failed(keys, now)
                dirty |= set(keys)
        unsettled = dirty | {k for keys in in_flight.values() for k in keys}
        assert len(wb) == len(unsettled)
        assert all(wb.is_dirty(k) == (k in unsettled) for k in range(30))


def test_an_actor_dropped_during_a_failed_write_and_changed_again_is_still_dirty():
    wb = make()
    wb.mark_dirty("a")
    batch = wb.take_batch(0.1)
    wb.discard("a")  # its activation is dropped while the write is under way
    wb.failed(batch, 0.2)  # ...and the write fails
    wb.mark_dirty("a")  # a new activation changes it
    assert wb.is_dirty("a") and len(wb) == 1
    assert wb.take_batch(10.0) == ["a"]


def test_a_key_its_batch_skips_after_a_discard_settles():
    """The persister takes a batch, finds no activation for a key (it was dropped) and
    skips it: the key must not stay in flight, or it is never written again."""
    wb = make()
    wb.mark_dirty("a")
    wb.take_batch(0.1)
    wb.discard("a")  # dropped while its write was being prepared
    wb.skipped("a")
    assert len(wb) == 0
    wb.mark_dirty("a")  # a new activation changes it
    assert wb.take_batch(10.0) == ["a"]


def test_a_long_outage_keeps_backing_off_at_the_cap():
    """Thousands of failures in a row (a Redis outage of minutes at a short cap) must not
    overflow the backoff: 2**1024 is past a float."""
    wb = make(retry_cap=0.005)
    wb.mark_dirty("a")
    now = 0.1
    batch = wb.take_batch(now)
    for _ in range(5000):
        assert 0 <= wb.failed(batch, now) <= 0.005
        now = wb.next_flush
        batch = wb.take_batch(now)
        assert batch == ["a"]
    wb.flushed(batch)
    assert len(wb) == 0
