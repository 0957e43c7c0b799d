from gateway.ratelimit import TokenBucket


def test_burst_then_steady_rate():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(0.0) for _ in range(5))
    assert not bucket.take(0.0)
    assert bucket.take(0.1)  # one token back after 100 ms
    assert not bucket.take(0.1)
    # Over 10 s at 10/s the bucket lets through about 100, never more than rate * t + burst.
    allowed = sum(bucket.take(0.1 + i * 0.001) for i in range(10_000))
    assert 95 <= allowed <= 101


def test_idle_time_saves_up_only_to_burst():
    bucket = TokenBucket(rate=1, burst=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3
