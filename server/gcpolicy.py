"""How the gateway and the nodes run CPython's garbage collector (decision 28).

A collection walks every object of the generations it collects. A gateway holds ~85
tracked objects per session: a full collection with 2,000 sessions (211k objects) paused
the process 216-280 ms here, 0.3-0.5 s with 4,000-6,000. CPython runs one whenever the
objects that reached the oldest generation have grown by a quarter since the last, so at
every 25 % more sessions every client of the process waited that long.

The policy: once the process has started, and at the end of every full collection, what is
live is frozen (`gc.freeze()`, a list splice: the objects move to a permanent generation that
no collection walks). A full collection then walks only what was made since the previous
one. (CPython sizes its next trigger by the survivors of the last full collection, which are
now few: full collections come as often as its third threshold allows, each a short walk.)

The cost: an object frozen while live that later dies in a reference cycle is not reclaimed
by the collector. Sessions and actors die by reference counting (tests/integration/
test_observability.py checks clean closes and aborted clients), and every
`reclaim_interval_s` the policy unfreezes and collects everything once, logging what that
freed; `/admin/gc` does the same at once and names the types it freed.

It also keeps each generation's collections and pauses for /metrics and /status.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import random
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.config import GcSettings
from server.hotmetrics import LatencyHistogram

log = logging.getLogger("ringside.gc")

PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GENERATIONS = (0, 1, 2)
RECLAIM_RETRIES = 10  # a reclaim finds another thread collecting: try again a second later


class GcPolicy(Collector):
    def __init__(self, settings: GcSettings) -> None:
        self.settings = settings
        self.collections = [0, 0, 0]
        self.pauses = [LatencyHistogram("ringside_gc_pause_seconds", "", PAUSE_BUCKETS) for _ in GENERATIONS]
        self.longest_pause = [0.0, 0.0, 0.0]
        self.collected = 0  # unreachable objects the collector found: cycles being made
        self.reclaims = 0
        self.reclaimed = 0  # objects freed by reclaims: cycles among frozen objects
        self.reclaim_seconds = 0.0
        self.longest_reclaim = 0.0
        self._started_at = 0.0
        self._reclaiming: int | None = None  # the thread running a reclaim
        self._reclaim_collected = False
        self._installed = False

    def start(self) -> None:
        """Call once the process has built what it keeps for its lifetime."""
        gc.collect()
        if self.settings.freeze:
            gc.freeze()
        gc.callbacks.append(self._on_gc)
        self._installed = True
        log.info(
            "gc policy",
            extra={
                "freeze": self.settings.freeze,
                "frozen": gc.get_freeze_count(),
                "reclaim_interval_s": self.settings.reclaim_interval_s,
            },
        )

    def close(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Runs in whichever thread collects; the collector runs one collection at a time.
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        if self._reclaiming == threading.get_ident():  # timed and counted by reclaim()
            self._reclaim_collected = True
            return
        pause = time.perf_counter() - self._started_at
        generation = info["generation"]
        self.collections[generation] += 1
        self.pauses[generation].observe(pause)
        self.longest_pause[generation] = max(self.longest_pause[generation], pause)
        self.collected += info["collected"]
        if generation == 2 and self.settings.freeze:
            # The survivors of a full collection are all live: the next one need not walk them.
            gc.freeze()

    @property
    def pause_seconds(self) -> list[float]:
        return [h.sum for h in self.pauses]

    def reclaim(self, *, census: bool = False) -> dict[str, Any]:
        """Unfreeze, collect everything, freeze again. `ran` is False when another thread
        was collecting (CPython then skips the call: what was frozen is frozen again);
        `census` names the types freed, at the cost of a second walk."""
        started = time.perf_counter()
        self._reclaiming, self._reclaim_collected = threading.get_ident(), False
        types: list[tuple[str, int]] = []
        frames: list[tuple[str, int]] = []
        freed = 0
        try:
            gc.unfreeze()
            debug, saved_before = gc.get_debug(), len(gc.garbage)
            if census:
                gc.set_debug(debug | gc.DEBUG_SAVEALL)
            try:
                freed = gc.collect()
            finally:
                if census:
                    gc.set_debug(debug)
                    try:
                        saved = gc.garbage[saved_before:]
                    finally:
                        del gc.garbage[saved_before:]
            ran = self._reclaim_collected
            if census and ran:
                types = collections.Counter(type(o).__name__ for o in saved).most_common(10)
                # Cycles through frames are mostly exceptions kept with their tracebacks: the
                # functions say where.
                frames = collections.Counter(
                    f"{o.f_code.co_qualname} ({o.f_code.co_filename.rsplit('/', 1)[-1]}:{o.f_lineno})"
                    for o in saved
                    if isinstance(o, FrameType)
                ).most_common(10)
                del saved
                gc.collect()  # what the census held is unreachable again
        finally:
            self._reclaiming = None
            if self.settings.freeze:
                gc.freeze()
        pause = time.perf_counter() - started
        if ran:
            self.reclaims += 1
            self.reclaimed += freed
            self.reclaim_seconds += pause
            self.longest_reclaim = max(self.longest_reclaim, pause)
        result = {
            "ran": ran,
            "freed": freed,
            "freed_types": types,
            "freed_frames": frames,
            "pause_ms": round(pause * 1000, 1),
            "frozen": gc.get_freeze_count(),
        }
        if ran:
            log.info("gc reclaim", extra=result)
        else:
            log.warning("gc reclaim skipped: another thread was collecting")
        return result

    async def run(self) -> None:
        """Reclaim every `reclaim_interval_s` (0: never), +-10 % so that processes started
        together do not pause together."""
        interval = self.settings.reclaim_interval_s
        if not self.settings.freeze or interval <= 0:
            return
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            for _ in range(RECLAIM_RETRIES):
                if self.reclaim()["ran"]:
                    break
                await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        return {
            "freeze": self.settings.freeze,
            "frozen_objects": gc.get_freeze_count(),
            "collections": list(self.collections),
            "longest_pause_ms": [round(p * 1000, 2) for p in self.longest_pause],
            "collected_objects": self.collected,
            "reclaims": self.reclaims,
            "reclaimed_objects": self.reclaimed,
            "longest_reclaim_ms": round(self.longest_reclaim * 1000, 2),
        }

    def collect(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "ringside_gc_pause_seconds",
            "Garbage collections by generation and how long each paused the process",
            labels=["generation"],
        )
        for generation, histogram in zip(GENERATIONS, self.pauses, strict=True):
            buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in histogram.cumulative()]
            pauses.add_metric([str(generation)], buckets, sum_value=histogram.sum)
        yield pauses
        yield GaugeMetricFamily(
            "ringside_gc_frozen_objects",
            "Objects in the permanent generation, which collections do not walk",
            value=gc.get_freeze_count(),
        )
        yield CounterMetricFamily(
            "ringside_gc_collected_objects",
            "Unreachable objects found by the collector: reference cycles the process makes",
            value=self.collected,
        )
        yield CounterMetricFamily("ringside_gc_reclaims", "Reclaims run (decision 28)", value=self.reclaims)
        yield CounterMetricFamily(
            "ringside_gc_reclaim_seconds", "Time reclaims paused the process", value=self.reclaim_seconds
        )
        yield CounterMetricFamily(
            "ringside_gc_reclaimed_objects",
            "Objects freed by reclaims: reference cycles among frozen objects",
            value=self.reclaimed,
        )
