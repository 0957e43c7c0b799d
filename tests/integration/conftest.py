"""Real-process fixtures: embedded Redis, nodes and a gateway on free loopback ports."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from server.cluster import LocalCluster, http_json
from server.config import load_config
from server.tokens import mint


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(directory: Path, *, nodes: int = 3, extra: str = "") -> Path:
    ports = free_ports(3 + 3 * nodes)
    lines = [
        "[cluster]",
        'secret = "test-secret"',
        f'run_dir = "{directory / "run"}"',
        "[redis]",
        f"port = {ports[0]}",
        "[gateway]",
        f"port = {ports[1]}",
        f"gossip_port = {ports[2]}",
        "handshake_timeout_s = 1.0",
        "max_frame_bytes = 4096",
    ]
    extra_sections: dict[str, list[str]] = {}
    section = None
    for line in extra.strip().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
            extra_sections.setdefault(section, [])
        elif line and section:
            extra_sections[section].append(line)
    if "[gateway]" in extra_sections:
        lines += extra_sections.pop("[gateway]")
    for header, body in extra_sections.items():
        lines += [header, *body]
    for i in range(nodes):
        link, admin, gossip = ports[3 + 3 * i : 6 + 3 * i]
        lines += [
            "[[nodes]]",
            f'name = "n{i + 1}"',
            f"link_port = {link}",
            f"admin_port = {admin}",
            f"gossip_port = {gossip}",
        ]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


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
            lambda: all(self.node_status(n)["dirty"] == 0 for n in self.config.node_names),
            timeout,
            "nodes still hold dirty actors",
        )

    def owner(self, player: str) -> str:
        from server.ring import HashRing

        return HashRing(self.config.node_names).owner(player)


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


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    started: list[Cluster] = []

    def factory(*, nodes: int = 3, extra: str = "") -> Cluster:
        cluster = Cluster(write_config(tmp_path / f"c{len(started)}", nodes=nodes, extra=extra))
        started.append(cluster)
        cluster.local.up()
        return cluster

    yield factory
    for cluster in started:
        cluster.local.down()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()
