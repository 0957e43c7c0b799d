import subprocess
import sys
import time
from pathlib import Path

import pytest

import server
from loadtest.harness import write_config
from server.cluster import ClusterError, LocalCluster, pid_alive
from server.config import load_config


def test_down_with_nothing_running_says_so(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    said: list[str] = []
    LocalCluster(load_config(config_path, env={}), str(config_path), progress=said.append).down()
    assert said == [f"nothing was running (run dir {tmp_path / 'run'})"]


def test_kill_and_pause_name_an_unknown_process(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    cluster = LocalCluster(load_config(config_path, env={}), str(config_path), progress=lambda _m: None)
    with pytest.raises(ClusterError, match=r"no process named 'n9' \(have n1, n2, n3, gateway, redis\)"):
        cluster.kill("n9")
    with pytest.raises(ClusterError, match="no process named 'n9'"):
        cluster.pause("n9", 1.0)
    with pytest.raises(ClusterError, match="n2 is not running"):
        cluster.kill("n2")


def test_make_refuses_a_misspelt_variable() -> None:
    """`make loadtest USER=20` (for USERS) ran with the default 200 users, without a word."""
    root = Path(__file__).resolve().parents[2]
    typo = subprocess.run(["make", "-n", "status", "USER=20"], cwd=root, capture_output=True, text=True)
    assert typo.returncode != 0 and "unknown variable USER (a typo?)" in typo.stderr, typo.stderr
    known = ["USERS=20", "NODE=n2", "REDIS_URL=redis://x", "LOG_LEVEL=debug", "RINGSIDE_NODE_HANDOFF=redis"]
    fine = subprocess.run(["make", "-n", "status", *known], cwd=root, capture_output=True, text=True)
    assert fine.returncode == 0, fine.stderr


def test_processes_run_the_code_that_started_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nodes and the gateway start through the venv's `ringside` script, whose editable
    install points at one checkout; `loadtest.cpu_ab` runs another commit's checkout with
    that venv, and each side must run its own code. Here another `server` on the path (a
    decoy) stands for the checkout the venv points at."""
    decoy = tmp_path / "decoy"
    (decoy / "server").mkdir(parents=True)
    (decoy / "server" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy))
    monkeypatch.chdir(tmp_path)
    config_path = write_config(tmp_path / "c")
    cluster = LocalCluster(load_config(config_path, env={}), str(config_path), progress=lambda _m: None)
    code = "import server, sys; print(server.__file__); sys.stdout.flush()"
    pid = cluster._spawn("probe", [sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    printed = cluster.log_file("probe").read_text().strip()
    assert Path(printed).resolve().parent == Path(server.__file__).resolve().parent, printed
