from pathlib import Path

from loadtest.harness import write_config
from server.cluster import LocalCluster
from server.config import load_config


def test_down_with_nothing_running_says_so(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    said: list[str] = []
    LocalCluster(load_config(config_path, env={}), str(config_path), progress=said.append).down()
    assert said == [f"nothing was running (run dir {tmp_path / 'run'})"]
