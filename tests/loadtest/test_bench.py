"""One short real run of loadtest/bench.py (`--quick`, fewer idle sessions).

Not a benchmark and no timed assertion: it checks that every phase runs and yields its
figure, that the side-by-side CPU phase really ran three times with both sides answered in
full (and twice more with every session on one node, which that node's CPU shows), and that
the table prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "loadtest.bench",
        "--quick",
        "--idle-sessions",
        "300",
        "--json-out",
        str(out),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())

    pairs = r["ringside"]["cpu_pairs"]
    assert len(pairs) == 3
    for pair in pairs:
        assert pair["ringside_us"] > 0 and pair["echo_us"] > 0, pair
        assert pair["errors"] == [0, 0] and pair["unanswered"] == [0, 0], pair
    one = r["ringside"]["one_owner_pairs"]
    assert len(one) == 2
    for pair in one:
        assert pair["errors"] == [0, 0] and pair["unanswered"] == [0, 0], pair
        # Every session on n1: the other nodes only idle (gossip, timers) meanwhile.
        per = pair["per_process_us"]
        assert per["n1"] > 2 * max(per["n2"], per["n3"]), per
    assert r["ringside"]["cpu_us_per_req_server"] > 0 and r["echo"]["cpu_us_per_msg"] > 0
    # At 2,000/s over 200 sessions the processes sleep between requests: wake-ups are counted
    # (at this rate, several requests share a wake-up only now and then).
    wakes = r["ringside"]["wakeups_per_req"]
    assert wakes["gateway"] > 0.2 and sum(wakes.values()) > 0.5 and r["echo"]["wakeups_per_msg"] > 0.2, wakes
    assert r["ringside"]["closed"]["requests"] > 0 and r["ringside"]["closed"]["cpu_us_per_req"] > 0
    assert r["echo"]["closed"]["cpu_us_per_msg"] > 0
    for side in ("ringside", "echo"):
        latency = r[side]["latency"]
        assert latency["answered"] > 0 and latency["unanswered"] == 0 and latency["errors"] == 0, side

    assert r["memory"]["idle_sessions"] == 300 and r["memory"]["open_failed"] == 0
    assert r["memory"]["gateway_kib_per_session"] > 0 and r["memory"]["node_kib_per_player"] > 0
    assert r["write_behind"]["evalsha_per_1000"] > 0  # the nodes flushed during the phase
    assert r["flush"]["cas_states_per_cpu_s"] > 0 and r["flush"]["set_states_per_cpu_s"] > 0
    assert r["activation"]["cold"]["failed"] == 0 and r["activation"]["cold"]["opened"] > 0

    assert "ratio, each side-by-side run" in run.stdout

    # Each target the run measured, met or not, in the JSON and said after the table.
    met = r["targets"]
    # --quick measures latency and idle sessions below the scale, and no concurrency.
    assert set(met) == {
        "cpu_spread_le_2x",
        "cpu_one_node_le_2x",
        "player_actor_lt_2kib",
        "flush_ge_100k_states_per_core",
    }
    assert "p99 < 2 ms: not measured at its scale" in run.stdout
    assert met["cpu_spread_le_2x"] == (
        r["ringside"]["cpu_us_per_req_server"] <= 2 * r["echo"]["cpu_us_per_msg"]
    )
    assert f"targets met: {sum(met.values())} of {len(met)}" in run.stdout
    assert json.loads(run.stdout.strip().splitlines()[-1])["ringside"]["cpu_pairs"] == pairs
