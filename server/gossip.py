"""asyncio adapter for :mod:`server.swim`: UDP for probes and gossip, TCP for push-pull.

The adapter only moves bytes and time: every datagram goes through the codec (bad ones are
counted and dropped) into ``Swim.receive``; ``Swim.tick`` runs when ``Swim.next_deadline``
says (at least every ``max_tick_interval``); what they return is sent. A push-pull exchange
is one length-prefixed frame each way on a TCP connection to the same port number as the
UDP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from server.swim import MemberEvent, Outgoing, Swim, SwimConfig
from server.swim_codec import Addr, GossipDecodeError, GossipKey, PushPull, decode, encode

__all__ = ["GossipEndpoint"]

log = logging.getLogger(__name__)
_LEN = struct.Struct("!I")
MAX_DATAGRAM = 65_000
TIMER_SLACK_S = 0.001  # the loop's timers are in whole milliseconds: do not wake early
STALE_DEADLINE_TICK_S = 0.02  # cadence while a deadline stays due after a tick


class _FrameError(Exception):
    pass


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > limit:
        raise _FrameError(f"frame of {size} bytes exceeds {limit}")
    return await reader.readexactly(size)


async def _write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, endpoint: GossipEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.endpoint._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a dead peer's port: expected, and the probe timeout handles it.
        pass


class GossipEndpoint:
    """One cluster member on the network. ``await start()``, later ``leave()`` or ``stop()``.

    Observe membership with ``on_event`` (called in the loop, must not block), with
    ``async for ev in endpoint.events()``, or with ``await wait_until(predicate, timeout)``.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        key: GossipKey,
        seeds: Sequence[Addr] = (),
        meta: Mapping[str, Any] | None = None,
        config: SwimConfig | None = None,
        max_tick_interval: float = 0.25,  # capped at half of SwimConfig.pause_threshold
        rng: random.Random | None = None,
        on_event: Callable[[MemberEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        push_pull_timeout: float = 2.0,
        max_push_pulls: int = 4,  # concurrent TCP exchanges, each direction
        max_frame: int = 8 << 20,
    ) -> None:
        self.name, self.host, self.port = name, host, port
        self._key = key
        self._seeds = list(seeds)
        self._meta = dict(meta or {})
        self._config = config or SwimConfig()
        self._max_tick_interval = max_tick_interval
        self._sleeping_until = math.inf  # when the ticker wakes next
        self._rearm = asyncio.Event()  # an earlier deadline appeared: wake the ticker
        self._rng = rng or random.Random()
        self._on_event = on_event
        self._clock = clock
        self._pp_timeout = push_pull_timeout
        self._max_pp = max_push_pulls
        self._max_frame = max_frame
        self._swim: Swim | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._outbound: set[asyncio.Task[None]] = set()
        self._inbound = 0
        self._subscribers: set[asyncio.Queue[MemberEvent]] = set()
        self._changed = asyncio.Event()
        self.dropped = 0  # packets that failed authentication or parsing

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._swim is not None

    @property
    def swim(self) -> Swim:
        if self._swim is None:
            raise RuntimeError("endpoint not started")
        return self._swim

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # port 0: find a number free for both UDP and TCP
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port), family=socket.AF_INET
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_push_pull, self.host, port)
            except OSError:
                udp.close()
                if self.port:
                    raise
                continue
            self._udp, self.port = udp, port
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        now = self._clock()
        self._swim = Swim(
            self.name,
            self.addr,
            meta=self._meta,
            seeds=self._seeds,
            config=self._config,
            rng=self._rng,
            now=now,
        )
        self._flush(self._swim.start(now))
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"gossip-tick-{self.name}")

    async def stop(self) -> None:
        """Stop at once, like a crash as far as peers can tell."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._outbound):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def leave(self, timeout: float = 5.0, linger: float | None = None) -> bool:
        """Gossip our departure, wait until it has been spread (or ``timeout``), then stop.
        Returns whether the departure was fully gossiped."""
        self._flush(self.swim.leave(self._clock(), linger))
        try:
            await self.wait_until(lambda s: s.leave_complete, timeout)
            done = True
        except TimeoutError:
            done = False
        await self.stop()
        return done

    def probe_now(self, name: str) -> None:
        """Fast evidence: a link to ``name`` broke; probe it now."""
        self._flush(self.swim.probe_now(name, self._clock()))

    # -- observation ----------------------------------------------------------------------

    async def events(self, maxsize: int = 1024) -> AsyncIterator[MemberEvent]:
        """Membership events from now on. A consumer that falls ``maxsize`` behind loses
        the oldest ones; ``swim.members`` always has the current truth."""
        queue: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def wait_until(self, predicate: Callable[[Swim], bool], timeout: float) -> None:
        """Return once ``predicate(swim)`` holds; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self.swim):
                await self._changed.wait()

    # -- plumbing -------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        # Sleep to the state machine's next deadline instead of ticking at a fixed rate: an
        # idle member wakes a few times per protocol period, not 50 times a second.
        while True:
            now = self._clock()
            # Below pause_threshold, or every quiet gap would look like a process pause.
            longest = min(self._max_tick_interval, self.swim.config.pause_threshold / 2)
            delay = min(self.swim.next_deadline() - now, longest)
            if delay <= 0:
                delay = STALE_DEADLINE_TICK_S  # the last tick left it due: never spin
            self._sleeping_until = now + delay
            self._rearm.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay + TIMER_SLACK_S):
                    await self._rearm.wait()
            self._sleeping_until = math.inf
            try:
                self._flush(self.swim.tick(self._clock()))
            except Exception:
                log.exception("gossip tick failed")

    def _flush(self, outs: list[Outgoing]) -> None:
        for out in outs:
            if out.push_pull:
                self._start_push_pull(out)
            elif self._udp is not None:
                data = encode(out.message, self._key)
                if len(data) <= MAX_DATAGRAM:
                    self._udp.sendto(data, out.addr)
        events = self.swim.take_events()
        for ev in events:
            if self._on_event is not None:
                try:
                    self._on_event(ev)
                except Exception:
                    log.exception("membership event callback failed")
            for queue in self._subscribers:
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(ev)
        # Wake waiters after every input: predicates may depend on more than events.
        self._changed.set()
        if self._sleeping_until < math.inf and self.swim.next_deadline() < self._sleeping_until:
            self._rearm.set()
        self._changed = asyncio.Event()

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        try:
            msg = decode(data, self._key)
        except GossipDecodeError:
            self.dropped += 1
            return
        if self._swim is None:
            return  # came while we start, between the bind and the state machine: as if lost
        if isinstance(msg, PushPull):
            self.dropped += 1  # full state only travels over TCP
            return
        self._flush(self._swim.receive(self._clock(), addr, msg))

    def _start_push_pull(self, out: Outgoing) -> None:
        if len(self._outbound) >= self._max_pp or self._udp is None:
            return
        task = asyncio.create_task(self._push_pull(out))
        self._outbound.add(task)
        task.add_done_callback(self._outbound.discard)

    async def _push_pull(self, out: Outgoing) -> None:
        try:
            async with asyncio.timeout(self._pp_timeout):
                reader, writer = await asyncio.open_connection(*out.addr)
                try:
                    await _write_frame(writer, encode(out.message, self._key))
                    reply = decode(await _read_frame(reader, self._max_frame), self._key)
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, _FrameError):
            return  # the state machine retries: seeds on its join timer, peers next interval
        except GossipDecodeError:
            self.dropped += 1
            return
        if self._udp is not None and isinstance(reply, PushPull) and reply.reply:
            self._flush(self.swim.receive(self._clock(), out.addr, reply))

    async def _serve_push_pull(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._inbound >= self._max_pp or self._swim is None:
            writer.close()
            return
        self._inbound += 1
        try:
            async with asyncio.timeout(self._pp_timeout):
                msg = decode(await _read_frame(reader, self._max_frame), self._key)
                if not isinstance(msg, PushPull) or msg.reply:
                    self.dropped += 1
                    return
                peer = writer.get_extra_info("peername")
                outs = self._swim.receive(self._clock(), (peer[0], peer[1]), msg)
                replies = [o for o in outs if isinstance(o.message, PushPull) and o.message.reply]
                self._flush([o for o in outs if not (isinstance(o.message, PushPull) and o.message.reply)])
                for reply in replies:
                    await _write_frame(writer, encode(reply.message, self._key))
        except GossipDecodeError:
            self.dropped += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, _FrameError):
            pass
        finally:
            self._inbound -= 1
            writer.close()
