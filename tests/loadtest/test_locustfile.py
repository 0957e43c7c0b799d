"""A short real locust run of loadtest/locustfile.py against a scratch cluster.

Not a benchmark: it checks that the scenario runs under locust's gevent with
`websocket-client`, that every kind of request is recorded, and that none failed.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.harness import write_config
from server.cluster import LocalCluster
from server.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scratch_cluster(tmp_path: Path):
    config_path = write_config(tmp_path)
    cluster = LocalCluster(load_config(config_path, env={}), str(config_path), progress=lambda _m: None)
    try:
        cluster.up()
        yield config_path
    finally:
        cluster.down()


def test_locust_scenario_records_requests_without_failures(scratch_cluster: Path, tmp_path: Path) -> None:
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():
        pytest.skip("locust is not installed in this environment")
    env = dict(os.environ, RINGSIDE_CONFIG=str(scratch_cluster), RINGSIDE_RATE="10", RINGSIDE_CHAOS="")
    proc = subprocess.run(
        [
            str(locust),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "-u",
            "8",
            "-r",
            "8",
            "-t",
            "8s",
            "--csv",
            str(tmp_path / "run"),
            "--only-summary",
            "--exit-code-on-error",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, proc.stderr[-3000:]
    # 8 users at 10 Hz for ~8 s: hundreds of updates; one game of 8: one create, seven joins.
    assert int(rows["player.update"]["Request Count"]) > 200
    assert int(rows["hello"]["Request Count"]) == 8
    assert int(rows["game.create"]["Request Count"]) == 1
    assert int(rows["game.join"]["Request Count"]) == 7
    # Own actions come back as pushes: their delivery delays are recorded too.
    assert int(rows["game.event echo"]["Request Count"]) > 0
    assert "ringside locust summary" in proc.stderr
