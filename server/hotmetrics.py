"""Metrics counted on the request path: plain integers, turned into Prometheus families
only when /metrics is scraped.

prometheus_client's `Counter.inc()` takes a lock and checks observability on every call
(~0.85 us here) and `Histogram.observe()` walks its buckets in Python (~2.1 us); once per
request that is a visible share of a gateway's CPU. These keep the same exposition
(names, labels, buckets) for a dict update or a bisect (decision 21).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LabelledCounts(Collector):
    """A counter family keyed by a tuple of label values: `add(values)` per event."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, values: tuple[str, ...], amount: int = 1) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in list(self.counts.items()):
            family.add_metric(list(values), count)
        yield family


class Count(Collector):
    """An unlabelled counter: bump `value` directly (`count.value += 1`)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class LatencyHistogram(Collector):
    """A histogram with fixed upper bounds; `observe(seconds)` is one bisect."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, float]]:
        """(upper bound, observations at or below it), +Inf last."""
        out: list[tuple[float, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def collect(self) -> Iterator[Metric]:
        buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in self.cumulative()]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)
