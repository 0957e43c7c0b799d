from collections import Counter

import pytest

from server.ring import EmptyRing, HashRing

KEYS = [f"player:{i}" for i in range(100_000)]


def test_balance_ten_nodes():
    ring = HashRing([f"n{i}" for i in range(10)])
    load = Counter(ring.owner(k) for k in KEYS)
    mean = len(KEYS) / 10
    assert len(load) == 10
    assert max(load.values()) <= 1.10 * mean, load


def test_removing_a_node_moves_only_its_keys():
    before = HashRing([f"n{i}" for i in range(10)])
    after = HashRing([f"n{i}" for i in range(10) if i != 3])
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert moved, "some keys must move"
    assert all(before.owner(k) == "n3" for k in moved)
    assert len(moved) == sum(1 for k in KEYS if before.owner(k) == "n3")


def test_adding_a_node_moves_keys_only_to_it():
    before = HashRing(["a", "b", "c"])
    after = HashRing(["a", "b", "c", "d"])
    for k in KEYS[:20_000]:
        if before.owner(k) != after.owner(k):
            assert after.owner(k) == "d"


def test_same_members_same_owner_regardless_of_order():
    one = HashRing(["n3", "n1", "n2"])
    two = HashRing(["n1", "n2", "n3", "n2"])
    assert one == two
    assert all(one.owner(k) == two.owner(k) for k in KEYS[:5000])


def test_preference_list_distinct_and_starts_with_owner():
    ring = HashRing(["a", "b", "c"])
    for k in KEYS[:1000]:
        prefs = ring.preference_list(k, 5)
        assert prefs[0] == ring.owner(k)
        assert sorted(prefs) == ["a", "b", "c"]


def test_share_sums_to_one():
    shares = HashRing(["a", "b", "c"]).share()
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert all(0.2 < s < 0.5 for s in shares.values())


def test_empty_ring_raises():
    with pytest.raises(EmptyRing):
        HashRing([]).owner("x")
