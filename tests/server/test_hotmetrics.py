from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.hotmetrics import Count, LabelledCounts, LatencyHistogram

BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1.0)


def exposition(*collectors):
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()


def library_exposition(registry):
    # The library adds *_created samples; ours has no creation time to report.
    lines = generate_latest(registry).decode().splitlines()
    return "\n".join(line for line in lines if "_created" not in line)


def test_histogram_exposes_what_prometheus_client_would():
    registry = CollectorRegistry()
    theirs = Histogram("lat_seconds", "doc", buckets=BUCKETS, registry=registry)
    ours = LatencyHistogram("lat_seconds", "doc", BUCKETS)
    for value in (0.00005, 0.0001, 0.0002, 0.001, 0.05, 1.0, 3.0, 0.0):  # bounds are inclusive
        theirs.observe(value)
        ours.observe(value)
    assert exposition(ours).splitlines() == library_exposition(registry).splitlines()
    assert sum(ours.counts) == 8
    assert ours.cumulative()[-1] == (float("inf"), 8)


def test_counters_expose_what_prometheus_client_would():
    registry = CollectorRegistry()
    plain = Counter("requests", "doc", registry=registry)
    labelled = Counter("handled", "doc", ["op", "result"], registry=registry)
    ours_plain = Count("requests", "doc")
    ours_labelled = LabelledCounts("handled", "doc", ["op", "result"])
    for op, result in [("ping", "ok"), ("player.update", "ok"), ("ping", "ok"), ("other", "bad_request")]:
        plain.inc()
        labelled.labels(op, result).inc()
        ours_plain.value += 1
        ours_labelled.add((op, result))
    assert exposition(ours_plain, ours_labelled).splitlines() == library_exposition(registry).splitlines()
    assert ours_labelled.counts[("ping", "ok")] == 2
