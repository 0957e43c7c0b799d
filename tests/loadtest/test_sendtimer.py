"""The generator's send timer: never early, near the time asked, and the loop runs while it
waits. On both loops the generator may run on."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import pytest
import uvloop

from loadtest import sendtimer
from loadtest.sendtimer import SendTimer
from tests.loadtest.conftest import Runner

DELAYS = [0.0003, 0.0007, 0.0015, 0.02] * 5


async def wait_and_count_loop_work(timer: SendTimer, delays: list[float]) -> tuple[list[float], int]:
    """Wait for each delay in turn; return how late each wake was and how many callbacks
    the loop ran meanwhile."""
    loop = asyncio.get_running_loop()
    ran = 0
    late = []

    def tick() -> None:
        nonlocal ran
        ran += 1
        loop.call_later(0.001, tick)

    loop.call_soon(tick)
    for delay in delays:
        assert not timer.due(time.perf_counter() + 1.0)
        when = time.perf_counter() + delay
        await timer.until(when)
        late.append(time.perf_counter() - when)
    return late, ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_the_timerfd_wakes_at_the_time_asked_never_before(run: Runner) -> None:
    async def main() -> None:
        timer = SendTimer()
        assert timer.precise and sendtimer.exact_send_times()
        try:
            late, ran = await wait_and_count_loop_work(timer, DELAYS)
            assert timer.due(time.perf_counter())
        finally:
            timer.close()
        assert timer.expirations == len(DELAYS)  # every wake was the timerfd's
        assert min(late) >= 0
        # Typically ~0.1 ms; the loop's own timer would be off by up to a millisecond or more.
        assert statistics.median(late) < 0.002, late
        assert ran >= 5  # the 20 ms waits let the loop's other work run

    run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_close_cancels_a_pending_wait(run: Runner) -> None:
    async def main() -> None:
        timer = SendTimer()
        waiting = asyncio.ensure_future(timer.until(time.perf_counter() + 60))
        await asyncio.sleep(0.01)
        timer.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)

    run(main())


def test_without_a_timerfd_it_falls_back_to_the_loop_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendtimer, "_libc", lambda: None)

    async def main() -> None:
        timer = SendTimer()
        assert not timer.precise and not sendtimer.exact_send_times()
        when = time.perf_counter() + 0.0005
        assert timer.due(when)  # within the millisecond the loop's timer cannot resolve
        late, _ = await wait_and_count_loop_work(timer, [0.005, 0.02])
        timer.close()
        # The loop's clock is whole milliseconds: its timer may fire up to ~1.5 ms early,
        # which is why `due` allows a millisecond and the scheduler asks it again.
        assert min(late) >= -0.002

    uvloop.run(main())
