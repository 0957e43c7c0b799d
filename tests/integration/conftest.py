"""Real-process fixtures: embedded Redis, nodes and a gateway on free loopback ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from loadtest.harness import write_config
from server.cluster import LocalCluster, http_json
from server.config import load_config
from server.ring import HashRing
from server.tokens import mint


class Cluster:
    """A running local cluster plus the helpers tests need to check invariants."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path, env={})
        self.local = LocalCluster(self.config, str(config_path), progress=lambda _msg: None)
        g = self.config.gateway
        self.url = f"ws://{g.host}:{g.port}/ws"
        self._redis: redis.Redis | None = None

    def token(self, player: str, ttl: int = 3600) -> str:
        return mint(self.config.secret_bytes, player, expires_at=int(time.time()) + ttl)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.config.redis.effective_url, socket_timeout=2)
        return self._redis

    def stored_state(self, player: str) -> dict:
        blob = self.redis.get(f"rs:{{player:{player}}}:state")
        return orjson.loads(blob) if blob else {}

    def node_status(self, name: str) -> dict:
        code, body = http_json(self.local.admin_url(name) + "/status")
        assert code == 200, f"{name} /status answered {code}"
        return body

    def wait_flushed(self, timeout: float = 15.0) -> None:
        """Wait until no node holds a dirty actor (every acknowledged write is in Redis)."""
        wait_until(
            lambda: all(self.node_status(n)["dirty"] == 0 for n in self.running_nodes()),
            timeout,
            "nodes still hold dirty actors",
        )

    def wait_durable(self, timeout: float = 15.0) -> None:
        """Once every client has closed: wait until the gateway has released every session,
        which it does only when all the requests it acknowledged are reported durable, then
        until no node holds a dirty actor. `wait_flushed` alone is not enough after a fence:
        between the fenced owner dropping its activation (dirty no more) and the gateway's
        replay reaching the new activation, no node is dirty, yet Redis lacks those updates."""
        wait_until(
            lambda: self.gateway_status()["sessions"] == 0,
            timeout,
            "the gateway still holds requests that are not durable",
        )
        self.wait_flushed(timeout)

    def running_nodes(self) -> list[str]:
        return [n for n in self.config.node_names if self.local.pid(n) is not None]

    def gateway_status(self) -> dict:
        code, body = http_json(self.local.admin_url("gateway") + "/status")
        assert code == 200
        return body

    def stored_xp(self, player: str) -> int:
        return int(self.stored_state(player).get("xp", 0))

    def owner(self, player: str, members: list[str] | None = None) -> str:
        return HashRing(members or self.config.node_names).owner(f"player:{player}")


def wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.05)


async def await_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(0.02)


def is_stopped(cluster: Cluster, name: str) -> bool:
    """`name` is SIGSTOPped (`cluster.local.pause` under way): state T in /proc."""
    pid = cluster.local.pid(name)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "T"
    except (OSError, IndexError):
        return False


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    started: list[Cluster] = []

    def factory(*, nodes: int = 3, standby: int = 0, extra: str = "") -> Cluster:
        directory = tmp_path / f"c{len(started)}"
        cluster = Cluster(write_config(directory, nodes=nodes, standby=standby, extra=extra))
        started.append(cluster)
        cluster.local.up()
        return cluster

    yield factory
    for cluster in started:
        cluster.local.down()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()
