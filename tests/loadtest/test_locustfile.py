"""A short real locust run of loadtest/locustfile.py against a scratch cluster.

Not a benchmark: it checks that the scenario runs under locust's gevent with
`websocket-client`, that every kind of request is recorded, and that none failed.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loadtest.harness import write_config
from server.cluster import LocalCluster, pid_alive
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


def locust_command(config: Path, out: Path, *args: str, **settings: str) -> tuple[list[str], dict[str, str]]:
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():
        pytest.skip("locust is not installed in this environment")
    env = dict(os.environ, RINGSIDE_CONFIG=str(config), RINGSIDE_RATE="10", RINGSIDE_CHAOS="")
    env.update(settings)
    command = [str(locust), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless"]
    command += [*args, "--csv", str(out / "run"), "--html", str(out / "report.html"), "--only-summary"]
    command += ["--exit-code-on-error", "1"]
    return command, env


def run_locust(
    config: Path, out: Path, *args: str, expect_ok: bool = True, **settings: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, str]]]:
    command, env = locust_command(config, out, *args, **settings)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "run_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    return proc, rows


def assert_aggregated_is_the_clients_only(rows: dict[str, dict[str, str]]) -> None:
    """`Aggregated` sums the clients' rows: not the chaos rows (a 6 s pause is no request)."""
    clients = [row for name, row in rows.items() if name != "Aggregated" and row["Type"] != "chaos"]
    total = rows["Aggregated"]
    for column in ("Request Count", "Failure Count"):
        assert int(total[column]) == sum(int(row[column]) for row in clients), (column, rows)
    assert float(total["Max Response Time"]) == max(float(row["Max Response Time"]) for row in clients), rows


def run_refused(config: Path, out: Path, *args: str, **settings: str) -> tuple[str, float]:
    """A run of -t 30s that locust must refuse at once: its stderr and how long it took."""
    command, env = locust_command(config, out, "-u", "2", "-r", "2", "-t", "30s", *args, **settings)
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    took = time.monotonic() - started
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr, took


def test_locust_scenario_records_requests_without_failures(scratch_cluster: Path, tmp_path: Path) -> None:
    # A short pause of n2 (shorter than failure detection): its row is the local runner's.
    proc, rows = run_locust(
        scratch_cluster,
        tmp_path,
        *("-u", "8", "-r", "8", "-t", "8s"),
        RINGSIDE_CHAOS="pause:n2@2",
        RINGSIDE_PAUSE_S="0.3",
    )
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
    assert rows["pause n2"]["Type"] == "chaos" and rows["pause n2"]["Request Count"] == "1"
    assert float(rows["pause n2"]["Max Response Time"]) >= 300
    assert_aggregated_is_the_clients_only(rows)


def test_locust_kills_a_node_with_worker_processes(scratch_cluster: Path, tmp_path: Path) -> None:
    """`CHAOS=kill:n2@2` under `--processes 2`: the master kills the node, the workers' users
    ride through it, and the master reports the stall around it from the workers' requests."""
    pid = LocalCluster(load_config(scratch_cluster, env={}), str(scratch_cluster)).pid("n2")
    assert pid is not None and pid_alive(pid)
    proc, rows = run_locust(
        scratch_cluster,
        tmp_path,
        *("-u", "16", "-r", "16", "-t", "16s", "--processes", "2"),
        RINGSIDE_CHAOS="kill:n2@2",
        RINGSIDE_STALL_WINDOW_S="3",
        RINGSIDE_TIMEOUT_S="3",  # the stall row is due once the window's requests are settled
    )
    assert not pid_alive(pid), "the chaos action did not kill n2"
    assert rows["kill n2"]["Type"] == "chaos" and rows["kill n2"]["Request Count"] == "1"
    assert_aggregated_is_the_clients_only(rows)
    # Nothing lost when a node dies: the gateway replays n2's sessions on their new owners.
    assert int(rows["Aggregated"]["Failure Count"]) == 0, proc.stderr[-3000:]
    assert int(rows["hello"]["Request Count"]) == 16
    line = re.search(
        r"chaos kill n2 @2s \(done in [0-9.]+s\): requests sent from its second through 3s after it: (\d+), "
        r"failed (\d+), "
        r"longest stall (\d+) ms",
        proc.stderr,
    )
    assert line, proc.stderr[-3000:]
    sent, failed, stall = (int(g) for g in line.groups())
    # 16 users at 10 Hz from the kill's second through 3 s after it: only the workers send, so
    # this counts what they shipped to the master.
    assert sent > 200 and failed == 0, line.group(0)
    assert stall > 0, line.group(0)
    # The same stall as a row of its own, fired once the window settled (kill at 2 s, window
    # to 6 s, timeout 3 s, a worker report: ~13 s), while the test still ran: the master
    # writes its HTML report before the final summary.
    row = rows["kill n2: longest stall"]
    assert row["Type"] == "chaos" and row["Request Count"] == "1" and row["Failure Count"] == "0"
    assert abs(float(row["Max Response Time"]) - stall) <= 1, (row, line.group(0))
    assert round(float(row["Average Content Size"])) == sent, (row, line.group(0))  # the whole window
    assert "kill n2: longest stall" in (tmp_path / "report.html").read_text()
    assert "the test ended before this window settled" not in proc.stderr


def test_a_server_close_is_reported_with_its_close_code(scratch_cluster: Path, tmp_path: Path) -> None:
    """The gateway restarted under load: each user's lost connection is a failure naming
    the close code the gateway sent (1001), not the handshake's HTTP status."""
    local = LocalCluster(load_config(scratch_cluster, env={}), str(scratch_cluster))
    restarter = threading.Timer(3.0, local.restart_gateway)
    restarter.start()
    try:
        run_locust(scratch_cluster, tmp_path, "-u", "4", "-r", "4", "-t", "9s", expect_ok=False)
    finally:
        restarter.join()
    with open(tmp_path / "run_failures.csv", newline="") as fh:
        lost = [row for row in csv.DictReader(fh) if row["Name"] == "connection"]
    assert lost and all("(close 1001)" in row["Error"] for row in lost), lost


@pytest.mark.parametrize(
    ("chaos", "processes", "message"),
    [
        ("kill:n9@2", "1", "RINGSIDE_CHAOS: 'kill:n9@2': no process named 'n9' to kill"),
        ("drain:gateway@2", "1", "no process named 'gateway' to drain"),
        ("pause:n2@30", "1", "RINGSIDE_CHAOS: pause n2@30 would never happen: the test runs 30s (-t)"),
        ("kill:n2@45", "2", "RINGSIDE_CHAOS: kill n2@45 would never happen: the test runs 30s (-t)"),
    ],
)
def test_bad_chaos_is_refused_at_once(tmp_path: Path, chaos: str, processes: str, message: str) -> None:
    """No cluster needed: chaos settings are checked before the gateway is (a node the
    cluster does not have at import, a second past -t at init, on the master under
    --processes, which also sends its workers away)."""
    args = ("--processes", processes) if processes != "1" else ()
    stderr, took = run_refused(write_config(tmp_path), tmp_path, *args, RINGSIDE_CHAOS=chaos)
    assert message in stderr, stderr[-3000:]
    assert took < 10, took


def test_locust_refuses_to_start_when_the_gateway_does_not_answer(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)  # its ports are free: no cluster was started on them
    gateway = load_config(config_path, env={}).gateway
    stderr, took = run_refused(config_path, tmp_path)
    assert f"the gateway at {gateway.host}:{gateway.port} does not answer; is the cluster up" in stderr, (
        stderr
    )
    assert "ConnectionRefusedError" not in stderr and took < 10, (took, stderr[-3000:])


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RINGSIDE_RATE", "10hz", "RINGSIDE_RATE: expected a number, got '10hz'"),
        ("RINGSIDE_GAME_SIZE", "0", "RINGSIDE_GAME_SIZE: expected a positive number, got '0'"),
    ],
)
def test_a_bad_number_in_the_environment_is_a_usage_error(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    stderr, _ = run_refused(write_config(tmp_path), tmp_path, **{name: value})
    assert message in stderr, stderr[-3000:]


def test_chaos_that_did_not_run_fails_the_run(scratch_cluster: Path, tmp_path: Path) -> None:
    """Stopped (SIGTERM) before its chaos second: the run exits 1, although no request failed."""
    command, env = locust_command(
        scratch_cluster, tmp_path, "-u", "2", "-r", "2", "-t", "20s", RINGSIDE_CHAOS="kill:n2@15"
    )
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # stopped once its users run, well before the 15th second
            seen.append(line)
            if "All users spawned" in line:
                break
        proc.send_signal(signal.SIGTERM)
        stderr = "".join(seen) + proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert "chaos kill n2 @15s was planned but did not run" in stderr, stderr[-3000:]
