"""The generator's send timer: never early, and the loop runs while it waits."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from loadtest import sendtimer
from loadtest.sendtimer import SendTimer


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
        when = time.perf_counter() + delay
        assert not timer.due(when + 0.002)
        await timer.until(when)
        late.append(time.perf_counter() - when)
    return late, ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_the_timerfd_wakes_at_the_time_asked_never_before() -> None:
    async def main() -> None:
        timer = SendTimer()
        assert timer.precise
        try:
            late, ran = await wait_and_count_loop_work(timer, [0.0003, 0.0007, 0.0015, 0.02] * 5)
        finally:
            timer.close()
        assert min(late) >= 0
        assert timer.due(time.perf_counter())
        assert ran >= 5  # the 20 ms waits let the loop's other work run

    asyncio.run(main())


def test_without_a_timerfd_it_falls_back_to_the_loop_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendtimer, "_libc", lambda: None)

    async def main() -> None:
        timer = SendTimer()
        assert not timer.precise
        when = time.perf_counter() + 0.0005
        assert timer.due(when)  # within the millisecond the loop's timer cannot resolve
        late, _ = await wait_and_count_loop_work(timer, [0.005, 0.02])
        timer.close()
        # The loop's clock is whole milliseconds: its timer may fire up to ~1.5 ms early,
        # which is why `due` allows a millisecond and the scheduler asks it again.
        assert min(late) >= -0.002

    asyncio.run(main())
