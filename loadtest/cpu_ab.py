"""Server CPU per request of this checkout against another commit, measured in turns.

    .venv/bin/python -m loadtest.cpu_ab [--base HEAD~1] [--pairs 4] [--seconds 12]

This machine's load moves CPU-per-request figures by 10-20 % from one minute to the next, so
a before/after taken minutes apart says little about a change of that size. This runs the
bench's fixed-rate phase (a scratch cluster, 200 sessions, 2,000 `player.update`/s, CPU
seconds of the gateway and the nodes from /proc per request) alternately on this checkout
and on a clone of `--base` (made in a temporary directory, sharing this `.venv`), starting
with a different side each pair, and prints a line per run and the medians. Only
127.0.0.1; each run is bounded by `--seconds` plus the cluster's start and stop.

`measure` is the single run (`python -m loadtest.cpu_ab measure`), done in a subprocess
whose working directory is the checkout measured, so it imports that checkout's server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(seconds: float, sessions: int, rate: int) -> dict[str, float]:
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
        before = {n: cpu_seconds(p) for n, p in pids.items()}  # type: ignore[arg-type]
        result = pool[0]("rate", rate=rate, seconds=seconds)
        answered = max(1, result["answered_all"])
        per_request = {n: (cpu_seconds(p) - before[n]) / answered * 1e6 for n, p in pids.items()}  # type: ignore[arg-type]
        return {
            "total_us": per_request["gateway"] + sum(per_request[n] for n in config.node_names),
            "gateway_us": per_request["gateway"],
            "late_sends": result.get("late_sends", 0),
        }
    finally:
        if pool is not None:
            pool.stop()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)


def run_in(checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(ROOT / "loadtest" / "cpu_ab.py"), "measure"]
    command += ["--seconds", str(args.seconds), "--sessions", str(args.sessions), "--rate", str(args.rate)]
    child = subprocess.Popen(command, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=args.seconds + 120)
    except subprocess.TimeoutExpired:
        child.terminate()  # SIGTERM: it takes its cluster down before it exits
        child.communicate(timeout=60)
        raise RuntimeError(f"measuring {checkout} took too long; stopped") from None
    if child.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.cpu_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="compare", choices=["compare", "measure"])
    ap.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each fixed-rate phase")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--rate", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.command == "measure":
        print(json.dumps(measure(args.seconds, args.sessions, args.rate)))
        return 0
    clone = Path(tempfile.mkdtemp(prefix="ringside-ab-base-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.base], check=True)
        (clone / ".venv").symlink_to(ROOT / ".venv")
        sides = {"this checkout": ROOT, f"base {args.base}": clone}
        totals: dict[str, list[float]] = {name: [] for name in sides}
        for pair in range(args.pairs):
            order = list(sides) if pair % 2 == 0 else list(reversed(sides))
            for name in order:
                started = time.monotonic()
                r = run_in(sides[name], args)
                totals[name].append(r["total_us"])
                print(
                    f"pair {pair + 1}/{args.pairs} {name}: {r['total_us']:.1f} us per request "
                    f"(gateway {r['gateway_us']:.1f}; late sends {r['late_sends']}; "
                    f"{time.monotonic() - started:.0f} s)",
                    flush=True,
                )
        medians = {name: statistics.median(values) for name, values in totals.items()}
        ours, base = medians.values()
        print(
            f"median: this checkout {ours:.1f} us, base {base:.1f} us per request "
            f"({(ours / base - 1) * 100:+.1f} %)"
        )
        return 0
    finally:
        shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
