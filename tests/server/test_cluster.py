import subprocess
from pathlib import Path

import pytest

from loadtest.harness import write_config
from server.cluster import ClusterError, LocalCluster
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
