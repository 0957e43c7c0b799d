"""The concurrency phase's search (`loadtest.bench.concurrency_steps`) over a stand-in for
the generator pool whose p99 is a function of the sessions open: the search logic alone,
without the minutes of real load a step takes (the bench runs it for real)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from loadtest import bench


class ScriptedPool:
    """`GenPool`'s open / rate / close, answering with `p99_ms(sessions)`."""

    def __init__(self, p99_ms: Callable[[int], float], fail_open_past: int | None = None) -> None:
        self.p99_ms = p99_ms
        self.fail_open_past = fail_open_past
        self.open_now = 0
        self.opened_players: list[str] = []
        self.rates: list[int] = []

    @property
    def gens(self) -> list[Any]:
        return [type("Gen", (), {"open": self.open_now})()]

    def __len__(self) -> int:
        return 1

    def open(self, players: list[str], **_: Any) -> dict[str, Any]:
        failed = 0
        if self.fail_open_past is not None and self.open_now + len(players) > self.fail_open_past:
            failed = self.open_now + len(players) - self.fail_open_past
        self.opened_players += players
        self.open_now += len(players) - failed
        return {"total_open": self.open_now, "failed": failed, "first_error": "refused" if failed else None}

    def rate(self, rate: float, seconds: float) -> dict[str, Any]:
        assert rate == self.open_now  # one update a second per session
        self.rates.append(self.open_now)
        p99 = self.p99_ms(self.open_now)
        lat = {"n": int(rate * seconds), "p50_ms": p99 / 4, "p99_ms": p99, "max_ms": p99 * 2}
        return {"lat": lat, "achieved_rps": rate, "late_sends": 0, "unanswered": 0, "errors": 0}

    def close(self) -> dict[str, Any]:
        closed, self.open_now = self.open_now, 0
        return {"closed": closed}


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "log", lambda _msg: None)


def search(pool: ScriptedPool, bound: int = 100_000, budget_s: float = 60.0) -> dict[str, Any]:
    return bench.concurrency_steps(pool, "ringside", "ws://x", "secret", bound, budget_s, phase_s=1.0)  # type: ignore[arg-type]


def test_halves_the_gap_past_the_first_step_that_missed() -> None:
    pool = ScriptedPool(lambda n: 10.0 if n <= 7_900 else 80.0)
    r = search(pool)
    # Steps of 1.5x: 1,000 .. 6,000 held, 9,000 missed (twice); then 7,500 held, 8,250
    # missed (twice); 750 apart is within an eighth of 7,500: done.
    assert r["held_p99_under_50ms"] == 7_500
    assert pool.rates == [1_000, 1_500, 2_500, 4_000, 6_000, 9_000, 9_000, 7_500, 8_250, 8_250]
    assert r["stopped_by"] == "p99 80 ms at 8,250"
    assert pool.open_now == 0  # leaves no session open
    assert len(set(pool.opened_players)) == len(pool.opened_players)  # new players each time


def test_a_miss_between_the_steps_narrows_from_above() -> None:
    pool = ScriptedPool(lambda n: 10.0 if n <= 6_500 else 80.0)
    r = search(pool)
    assert r["held_p99_under_50ms"] == 6_000
    assert pool.rates[-4:] == [7_500, 7_500, 6_750, 6_750]
    assert r["stopped_by"] == "p99 80 ms at 6,750"


def test_one_slow_phase_is_measured_again() -> None:
    p99s = iter([10.0, 10.0, 90.0, 10.0])  # then 90 ms from 4,000 sessions on
    pool = ScriptedPool(lambda n: next(p99s, 90.0))
    r = search(pool)
    # 2,500 missed once and held on its second phase; everything after it missed twice.
    assert r["held_p99_under_50ms"] == 2_500
    assert pool.rates == [1_000, 1_500, 2_500, 2_500, 4_000, 4_000, 3_250, 3_250, 2_750, 2_750]
    assert r["stopped_by"] == "p99 90 ms at 2,750"


def test_no_halving_when_sessions_fail_to_open() -> None:
    pool = ScriptedPool(lambda n: 10.0, fail_open_past=5_000)
    r = search(pool)
    assert r["held_p99_under_50ms"] == 4_000
    assert r["stopped_by"] == "1,000 of 2,000 failing to open"
    assert pool.rates == [1_000, 1_500, 2_500, 4_000]


def test_the_bound_ends_the_steps() -> None:
    pool = ScriptedPool(lambda n: 10.0)
    r = search(pool, bound=5_000)
    assert r["held_p99_under_50ms"] == 5_000 and r["stopped_by"] == "the bound"


def test_the_time_budget_ends_the_halving(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(bench.time, "monotonic", lambda: now[0])
    pool = ScriptedPool(lambda n: 10.0 if n <= 7_900 else 80.0)
    measured = pool.rate

    def rate(rate: float, seconds: float) -> dict[str, Any]:
        now[0] += 10.0  # each phase takes 10 s of the budget
        return measured(rate, seconds)

    pool.rate = rate  # type: ignore[method-assign]
    r = search(pool, budget_s=65.0)
    assert pool.rates == [1_000, 1_500, 2_500, 4_000, 6_000, 9_000, 9_000]
    assert r["held_p99_under_50ms"] == 6_000
    assert r["stopped_by"] == "p99 80 ms at 9,000; the time budget ended the halving"


@pytest.mark.parametrize("bound", [1_300, 1_800, 2_900])
def test_a_bound_off_the_grid_is_halved_toward_and_never_remeasured(bound: int) -> None:
    pool = ScriptedPool(lambda n: 10.0 if n < bound else 80.0)
    r = search(pool, bound=bound)
    held = r["held_p99_under_50ms"]
    assert bound - held <= max(250, held // 8)
    # Each session count is measured once when it holds (twice only when it misses).
    held_counts = [n for n in pool.rates if n < bound]
    assert len(held_counts) == len(set(held_counts)), pool.rates
    assert r["stopped_by"] == f"p99 80 ms at {bound:,}"
