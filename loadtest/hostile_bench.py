"""Hostile clients beside honest players: does bad input hurt anyone else? (issue 7)

    .venv/bin/python -m loadtest.hostile_bench [--honest 100] [--hostile-frames 10000] [--seconds 10]

One scratch cluster (embedded Redis, 3 nodes, gateway; per-session rate limit 100/s).
Phase A: honest players send paced `player.update` increments; their latencies are the
baseline. Phase B: the same honest load while hostile clients send malformed JSON, oversized
frames, bad or missing tokens and floods past the rate limit. Reported: honest p50/p99 in B
against A (target: p99 within 2x), honest counters against Redis, process restarts, and the
close codes the hostile clients got. Everything targets 127.0.0.1 and is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.client import RingsideClient
from loadtest.harness import write_config
from server.cluster import LocalCluster, http_json
from server.config import load_config
from server.tokens import mint


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def honest(url: str, token: str, seconds: float, rate: float, lat: list[float]) -> int:
    acked = 0
    async with await RingsideClient.connect(url, token) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await client.request("player.update", {"incr": {"xp": 1}})
            lat.append((time.perf_counter() - started) * 1000)
            acked += 1
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
        assert client.closed_with is None, f"honest client closed with {client.closed_with}"
    return acked


FRAMES_PER_CONNECTION = {"malformed": 100, "flood": 1000, "oversized": 2, "unauthenticated": 2}


async def hostile(url: str, kind: str, frames: int, token: str, closes: collections.Counter[Any]) -> int:
    """Send up to `frames` bad frames of one kind on one connection; returns how many went out.
    Records the close code the gateway answered with (or "open" if it kept the socket)."""
    sent = 0
    code: Any = "open"
    try:
        async with connect(url, compression=None, max_size=None, open_timeout=10) as ws:
            if kind in ("malformed", "oversized", "flood"):
                await ws.send(orjson.dumps({"op": "hello", "token": token}).decode())
                await ws.recv()
            try:
                for i in range(frames):
                    if kind == "malformed":
                        data: str | bytes = random.choice(["{", "[]", '{"op": 5}', "\x00\xff", '{"id": 1}'])
                    elif kind == "oversized":
                        data = "x" * 8192
                    elif kind == "unauthenticated":
                        data = orjson.dumps({"op": "hello", "token": f"forged.{i}"}).decode()
                    else:  # flood: valid requests far past the rate limit
                        data = '{"id": 1, "op": "ping"}'
                    await ws.send(data)
                    sent += 1
                if kind != "malformed":
                    async with asyncio.timeout(5):  # read the backlog until the close frame
                        async for _ in ws:
                            pass
            except (ConnectionClosed, TimeoutError):
                pass
            code = ws.close_code if ws.close_code is not None else "open"
    except OSError as exc:
        code = type(exc).__name__
    closes[(kind, code)] += 1
    return sent


async def phase(
    url, tokens, seconds, rate, hostile_frames, secret
) -> tuple[list[float], dict[str, int], dict]:
    lat: list[float] = []
    closes: collections.Counter[Any] = collections.Counter()
    honest_tasks = [asyncio.create_task(honest(url, t, seconds, rate, lat)) for t in tokens.values()]
    hostile_sent = 0
    if hostile_frames:
        kinds = list(FRAMES_PER_CONNECTION)
        jobs: list[str] = []
        planned = 0
        while planned < hostile_frames:
            kind = kinds[len(jobs) % len(kinds)]
            jobs.append(kind)
            planned += FRAMES_PER_CONNECTION[kind]
        sem = asyncio.Semaphore(50)

        async def one(i: int, kind: str) -> int:
            async with sem:
                token = mint(secret, f"hostile{i}", expires_at=int(time.time()) + 600)
                return await hostile(url, kind, FRAMES_PER_CONNECTION[kind], token, closes)

        hostile_sent = sum(await asyncio.gather(*(one(i, kind) for i, kind in enumerate(jobs))))
    acked = dict(zip(tokens, await asyncio.gather(*honest_tasks), strict=True))
    return (
        lat,
        acked,
        {"hostile_frames_sent": hostile_sent, "closes": {f"{k}:{c}": n for (k, c), n in closes.items()}},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--honest", type=int, default=100)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s per honest player")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hostile-frames", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ringside-hostile-") as tmp:
        path = write_config(Path(tmp), extra="[gateway]\nrate_limit_per_s = 100.0\nrate_limit_burst = 200.0")
        config = load_config(path, env={})
        cluster = LocalCluster(config, str(path), progress=lambda m: print(m, flush=True))
        cluster.up()
        try:
            pids = {n: cluster.pid(n) for n in cluster.process_names()}
            url = f"ws://{config.gateway.host}:{config.gateway.port}/ws"
            secret = config.secret_bytes
            run = random.randrange(10**6)

            def tokens(tag: str) -> dict[str, str]:
                names = [f"{tag}{run}_{i}" for i in range(args.honest)]
                return {n: mint(secret, n, expires_at=int(time.time()) + 600) for n in names}

            print(f"phase A: {args.honest} honest players at {args.rate}/s for {args.seconds}s", flush=True)
            base_lat, base_acked, _ = asyncio.run(phase(url, tokens("a"), args.seconds, args.rate, 0, secret))
            print(f"phase B: same, plus {args.hostile_frames} hostile frames", flush=True)
            lat, acked, hostile_report = asyncio.run(
                phase(url, tokens("b"), args.seconds, args.rate, args.hostile_frames, secret)
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if all(
                    http_json(cluster.admin_url(n) + "/status")[1]["dirty"] == 0 for n in config.node_names
                ):
                    break
                time.sleep(0.1)
            r = redis.Redis.from_url(config.redis.effective_url)
            mismatched = 0
            for player, count in {**base_acked, **acked}.items():
                blob = r.get(f"rs:{{player:{player}}}:state")
                if (orjson.loads(blob)["xp"] if blob else 0) != count:
                    mismatched += 1
            restarted = [n for n, pid in pids.items() if cluster.pid(n) != pid]
        finally:
            cluster.down()
    result = {
        "command": "python -m loadtest.hostile_bench",
        "honest": args.honest,
        "rate_per_player": args.rate,
        "seconds": args.seconds,
        "baseline_ms": {"p50": pct(base_lat, 0.5), "p99": pct(base_lat, 0.99), "n": len(base_lat)},
        "hostile_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat)},
        "p99_ratio": pct(lat, 0.99) / pct(base_lat, 0.99),
        "p50_ratio": pct(lat, 0.5) / pct(base_lat, 0.5),
        "honest_mismatched_counters": mismatched,
        "restarted_processes": restarted,
        "mean_ms_baseline": statistics.fmean(base_lat) if base_lat else None,
        **hostile_report,
    }
    print(f"\n{'figure':<40} {'with hostile':>14} {'baseline':>10} {'ratio':>7}  target")
    print(
        f"{'honest p50 latency (ms)':<40} {result['hostile_ms']['p50']:>14.2f} "
        f"{result['baseline_ms']['p50']:>10.2f} {result['p50_ratio']:>6.2f}x"
    )
    print(
        f"{'honest p99 latency (ms)':<40} {result['hostile_ms']['p99']:>14.2f} "
        f"{result['baseline_ms']['p99']:>10.2f} {result['p99_ratio']:>6.2f}x  <= 2x"
    )
    print(f"honest counters not equal to acks: {mismatched}; restarted processes: {restarted or 'none'}")
    print(f"hostile frames sent: {hostile_report['hostile_frames_sent']}; closes: {hostile_report['closes']}")
    print(orjson.dumps(result, default=str).decode())


if __name__ == "__main__":
    main()
