"""Server CPU per request of this checkout against another commit.

    .venv/bin/python -m loadtest.cpu_ab [--base HEAD~1] [--pairs 4] [--seconds 12]
    .venv/bin/python -m loadtest.cpu_ab --side-by-side [--base HEAD~1] [--pairs 8]

This machine's load moves CPU-per-request figures by 10-20 % from one minute to the next, so
a before/after taken minutes apart says little about a change of that size. This runs the
bench's fixed-rate phase (a scratch cluster, 200 sessions, `player.update` at a fixed rate,
CPU seconds of the gateway and the nodes from /proc per request) on this checkout and on a
clone of `--base` (made in a temporary directory, sharing this `.venv`):

- in turns (the default): 2,000/s, one side at a time, starting with a different side each
  pair; a line per run and the medians;
- side by side (`--side-by-side`): both clusters up at once, each at half the rate (1,000/s:
  the same total load), their phases started at the same instant, `--pairs` phases in a row.
  Both sides meet the same minute of the machine, so the ratio of each pair is steadier than
  either figure; it prints each pair's ratio and their median.

Only 127.0.0.1; each run is bounded by `--seconds` plus the cluster's start and stop.

`measure` is one side's run (`python -m loadtest.cpu_ab measure`), done in a subprocess
whose working directory is the checkout measured, so it imports that checkout's server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SET_UP_S = 25.0  # for both clusters to start, open their sessions and warm up, side by side


def measure(
    seconds: float,
    sessions: int,
    rate: int,
    *,
    phases: int = 1,
    start_at: float | None = None,
    period: float = 0.0,
) -> list[dict[str, float]]:
    """One fixed-rate phase, or `phases` of them starting at `start_at` + i * `period`
    (time.monotonic(), the same clock in every process), on a cluster of its own."""
    sys.path.insert(0, str(Path.cwd()))
    from loadtest.bench import GenPool, cpu_seconds, players
    from loadtest.harness import write_config
    from server.cluster import LocalCluster
    from server.config import load_config

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit("stopped")  # run the finally below: the cluster goes down

    signal.signal(signal.SIGTERM, stop)
    workdir = Path(tempfile.mkdtemp(prefix="ringside-cpu-ab-"))
    config_path = write_config(workdir)
    config = load_config(config_path, env={})
    cluster = LocalCluster(config, str(config_path), progress=lambda _m: None)
    pool = None
    try:
        cluster.up()
        pool = GenPool(1)
        names = ["gateway", *config.node_names]
        pids = {n: cluster.pid(n) for n in names}
        g = config.gateway
        pool[0](
            "open",
            url=f"ws://{g.host}:{g.port}/ws",
            secret=config.secret,
            players=players("ab", sessions),
            update=True,
        )
        pool[0]("closed", seconds=2.0)  # warm: every actor active, every path run
        results = []
        for phase in range(phases):
            at = None if start_at is None else start_at + phase * period
            if at is not None:
                if at < time.monotonic():
                    what = "set-up" if phase == 0 else f"phase {phase}"
                    raise RuntimeError(f"{what} ran past the shared start of phase {phase + 1}")
                time.sleep(max(0.0, at - time.monotonic() - 0.05))
            before = {n: cpu_seconds(p) for n, p in pids.items()}  # type: ignore[arg-type]
            result = pool[0]("rate", rate=rate, seconds=seconds, start_at=at)
            answered = max(1, result["answered_all"])
            per_request = {n: (cpu_seconds(p) - before[n]) / answered * 1e6 for n, p in pids.items()}  # type: ignore[arg-type]
            results.append(
                {
                    "total_us": per_request["gateway"] + sum(per_request[n] for n in config.node_names),
                    "gateway_us": per_request["gateway"],
                    "late_sends": result.get("late_sends", 0),
                }
            )
        return results
    finally:
        if pool is not None:
            pool.stop()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)


def start_in(checkout: Path, args: argparse.Namespace, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(ROOT / "loadtest" / "cpu_ab.py"), "measure"]
    command += ["--seconds", str(args.seconds), "--sessions", str(args.sessions), "--rate", str(args.rate)]
    # Each side's cluster runs its own embedded Redis: an exported REDIS_URL would put both on
    # one Redis, where the sides' identical player keys would fence each other.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RINGSIDE_")}
    return subprocess.Popen(
        [*command, *extra], cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def stop(child: subprocess.Popen[str]) -> None:
    """SIGTERM: a run takes its cluster down before it exits; SIGKILL if it does not."""
    if child.poll() is None:
        child.terminate()
        try:
            child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


def results_of(child: subprocess.Popen[str], checkout: Path, timeout: float) -> list[dict[str, float]]:
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(child)
        raise RuntimeError(f"measuring {checkout} took too long; stopped") from None
    if child.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def in_turns(sides: dict[str, Path], args: argparse.Namespace) -> None:
    totals: dict[str, list[float]] = {name: [] for name in sides}
    for pair in range(args.pairs):
        order = list(sides) if pair % 2 == 0 else list(reversed(sides))
        for name in order:
            started = time.monotonic()
            [r] = results_of(start_in(sides[name], args), sides[name], args.seconds + 120)
            totals[name].append(r["total_us"])
            print(
                f"pair {pair + 1}/{args.pairs} {name}: {r['total_us']:.1f} us per request "
                f"(gateway {r['gateway_us']:.1f}; late sends {r['late_sends']}; "
                f"{time.monotonic() - started:.0f} s)",
                flush=True,
            )
    medians = {name: statistics.median(values) for name, values in totals.items()}
    ours, base = medians.values()
    change = (ours / base - 1) * 100
    print(f"median: this checkout {ours:.1f} us, base {base:.1f} us per request ({change:+.1f} %)")


def side_by_side(sides: dict[str, Path], args: argparse.Namespace) -> None:
    period = args.seconds + 1.0 + 5.0 + 2.0  # warm-up, phase, the generator's drain bound, margin
    start_at = time.monotonic() + SET_UP_S
    extra = ("--phases", str(args.pairs), "--start-at", repr(start_at), "--period", str(period))
    print(
        f"both clusters up at once, {args.rate}/s each; {args.pairs} phases of {args.seconds:.0f} s "
        f"from {SET_UP_S:.0f} s from now",
        flush=True,
    )
    children = {name: start_in(path, args, *extra) for name, path in sides.items()}
    timeout = SET_UP_S + args.pairs * period + 120
    try:
        ours, base = (results_of(child, sides[name], timeout) for name, child in children.items())
    finally:
        for child in children.values():  # one side failed: the other must not run on alone
            stop(child)
    ratios = []
    for i, (a, b) in enumerate(zip(ours, base, strict=True)):
        ratios.append(a["total_us"] / b["total_us"])
        print(
            f"pair {i + 1}/{args.pairs}: {(ratios[-1] - 1) * 100:+.1f} %: this checkout {a['total_us']:.1f} "
            f"us (gateway {a['gateway_us']:.1f}), base {b['total_us']:.1f} us "
            f"(gateway {b['gateway_us']:.1f}); "
            f"late sends {a['late_sends']} / {b['late_sends']}",
            flush=True,
        )
    low, mid, high = ((x - 1) * 100 for x in (min(ratios), statistics.median(ratios), max(ratios)))
    print(f"median of the pairs: {mid:+.1f} % (this checkout against base; from {low:+.1f} to {high:+.1f} %)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.cpu_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="compare", choices=["compare", "measure"])
    ap.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each fixed-rate phase")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--rate", type=int, default=0, help="per side (default 2,000/s; 1,000/s side by side)")
    ap.add_argument("--side-by-side", action="store_true", help="both sides at once, half the rate each")
    ap.add_argument("--phases", type=int, default=1, help=argparse.SUPPRESS)  # measure
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)  # measure
    ap.add_argument("--period", type=float, default=0.0, help=argparse.SUPPRESS)  # measure
    args = ap.parse_args(argv)
    args.rate = args.rate or (1000 if args.side_by_side else 2000)
    if args.command == "measure":
        print(
            json.dumps(
                measure(
                    args.seconds,
                    args.sessions,
                    args.rate,
                    phases=args.phases,
                    start_at=args.start_at,
                    period=args.period,
                )
            )
        )
        return 0
    clone = Path(tempfile.mkdtemp(prefix="ringside-ab-base-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.base], check=True)
        (clone / ".venv").symlink_to(ROOT / ".venv")
        sides = {"this checkout": ROOT, f"base {args.base}": clone}
        if args.side_by_side:
            side_by_side(sides, args)
        else:
            in_turns(sides, args)
        return 0
    finally:
        shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
