"""Wake-ups at a given `time.perf_counter()` instant, to about a tenth of a millisecond (the
median lateness measured here, on a loaded machine), for the bench generator's send schedule.

The event loop's own timers count whole milliseconds (libuv's): a generator that sleeps on
them either sends every message due within the next millisecond at once, which makes the
load burstier than independent clients and lets the servers batch more (measured: the CPU
one-node ratio ~5 % lower than with exact send times), or polls the loop until the exact time comes,
which keeps a core busy. A Linux timerfd in the loop's epoll set wakes it at the time asked,
and the loop keeps reading replies meanwhile. Where there is no timerfd, `until` falls back
to the loop's timer and the sends go out a millisecond at a time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import time

CLOCK_MONOTONIC = 1  # time.perf_counter()'s clock on Linux
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - present in glibc and musl
    except (OSError, AttributeError):
        return None
    return libc


def exact_send_times() -> bool:
    """Whether a SendTimer here wakes at exact times (a timerfd) rather than by milliseconds."""
    libc = _libc()
    if libc is None:
        return False
    fd = libc.timerfd_create(CLOCK_MONOTONIC, os.O_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


class SendTimer:
    """`await timer.until(t)` returns at perf_counter() >= t; `due(t)` says whether to send
    now. One per event loop and schedule; `close()` it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._spec = _Itimerspec()
        self._libc = _libc()
        self._fd = -1
        self.expirations = 0
        if self._libc is not None:
            fd = self._libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._loop.add_reader(fd, self._expired)

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def due(self, when: float) -> bool:
        """Time to send what is due at `when`: up to a millisecond early without a timerfd
        (a shorter sleep on the loop's timer returns at once, and waiting would spin)."""
        return time.perf_counter() >= (when if self._fd >= 0 else when - 0.001)

    async def until(self, when: float) -> None:
        if self._fd < 0:
            await asyncio.sleep(max(when - time.perf_counter(), 0))
            return
        assert self._libc is not None
        assert self._waiter is None, "one waiter at a time"
        seconds = int(when)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = int((when - seconds) * 1e9)
        if self._libc.timerfd_settime(self._fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _expired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # not expired after all
        self.expirations += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
