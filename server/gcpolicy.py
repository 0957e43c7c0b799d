"""How the gateway and the nodes run CPython's garbage collector (decision 28).

A collection walks every object of the generations it collects. A gateway holds ~85
tracked objects per session: a full collection with 2,000 sessions (211k objects) paused
the process 216-280 ms here, 0.3-0.5 s with 4,000-6,000. CPython runs one whenever the
objects that reached the oldest generation have grown by a quarter since the last, so at
every 25 % more sessions every client of the process waited that long.

The policy: once the process has started, and at the end of every full collection, what is
live is frozen (`gc.freeze()`, a list splice: the objects move to a permanent generation that
no collection walks). A full collection then walks only what was made since the previous
one. The cost: an object frozen while live that later dies in a reference cycle is not
reclaimed. Sessions and actors die by reference counting (measured: closing 2,000 sessions
left no cyclic garbage), and every `reclaim_interval_s` the policy unfreezes and collects
everything once, logging what that freed, so a cycle we did not foresee is bounded.

It also keeps each generation's collections and pauses for /metrics and /status.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.config import GcSettings

log = logging.getLogger("ringside.gc")

PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GENERATIONS = (0, 1, 2)


class GcPolicy(Collector):
    def __init__(self, settings: GcSettings) -> None:
        self.settings = settings
        self.collections = [0, 0, 0]
        self.pause_seconds = [0.0, 0.0, 0.0]
        self.longest_pause = [0.0, 0.0, 0.0]
        self.collected = 0  # unreachable objects found by the collector itself
        self.reclaims = 0
        self.reclaimed = 0  # objects freed by reclaims: cycles among frozen objects
        self._buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in GENERATIONS]
        self._started_at = 0.0
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
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        pause = time.perf_counter() - self._started_at
        generation = info["generation"]
        self.collections[generation] += 1
        self.pause_seconds[generation] += pause
        self.longest_pause[generation] = max(self.longest_pause[generation], pause)
        self.collected += info["collected"]
        buckets = self._buckets[generation]
        for i, bound in enumerate(PAUSE_BUCKETS):
            if pause <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        if generation == 2 and self.settings.freeze:
            # The survivors of a full collection are all live: the next one need not walk them.
            gc.freeze()

    def reclaim(self) -> int:
        """Unfreeze, collect everything, freeze again; returns the objects freed."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        if self.settings.freeze:
            gc.freeze()
        self.reclaims += 1
        self.reclaimed += freed
        log.info(
            "gc reclaim",
            extra={
                "freed": freed,
                "pause_ms": round((time.perf_counter() - started) * 1000, 1),
                "frozen": gc.get_freeze_count(),
            },
        )
        return freed

    async def run(self) -> None:
        """Reclaim every `reclaim_interval_s` (0: never)."""
        interval = self.settings.reclaim_interval_s
        if not self.settings.freeze or interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            self.reclaim()

    def status(self) -> dict[str, Any]:
        return {
            "freeze": self.settings.freeze,
            "frozen_objects": gc.get_freeze_count(),
            "collections": list(self.collections),
            "longest_pause_ms": [round(p * 1000, 2) for p in self.longest_pause],
            "reclaims": self.reclaims,
            "reclaimed_objects": self.reclaimed,
        }

    def collect(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "ringside_gc_pause_seconds",
            "Garbage collections by generation and how long each paused the process",
            labels=["generation"],
        )
        for generation in GENERATIONS:
            total = 0
            buckets = []
            for bound, n in zip((*PAUSE_BUCKETS, float("inf")), self._buckets[generation], strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            pauses.add_metric([str(generation)], buckets, sum_value=self.pause_seconds[generation])
        yield pauses
        yield GaugeMetricFamily(
            "ringside_gc_frozen_objects",
            "Objects in the permanent generation, which collections do not walk",
            value=gc.get_freeze_count(),
        )
        yield CounterMetricFamily(
            "ringside_gc_reclaimed_objects",
            "Objects freed by reclaims: reference cycles among frozen objects",
            value=self.reclaimed,
        )
