"""Scratch clusters on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Where the host's own range cannot be read: covers the usual ones (Linux 32768-60999,
# macOS and the BSDs 49152-65535).
DEFAULT_EPHEMERAL = (32768, 65535)


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out itself: to bind(0) and as the source port of connect()."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def _free_now(port: int) -> bool:
    """Nothing on this host holds `port` on loopback, for TCP or for UDP (gossip uses both)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now, for processes that bind them later.

    Not from the kernel's ephemeral range: a port from it, free when picked, could be handed
    by the kernel to anyone's bind(0) or connect() on the host before the process it is meant
    for binds it (seconds later for a cluster's last processes), which then fails with
    EADDRINUSE ("n1 exited during start"). Ports outside the range are only ever taken by
    an explicit bind: another caller of this function, which picks at random among ~20,000."""
    low, high = ephemeral_range()
    pool = [p for p in range(10_000, 65_536) if not low <= p <= high]
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(100 * n + 1000):
        port = rng.choice(pool)
        if port not in ports and _free_now(port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports in 10000-65535 outside {low}-{high}")


def write_config(directory: Path, *, nodes: int = 3, standby: int = 0, extra: str = "") -> Path:
    """A cluster of `nodes` (n1..) plus `standby` nodes that `up` does not start."""
    ports = free_ports(3 + 3 * (nodes + standby))
    lines = [
        "[cluster]",
        'secret = "test-secret"',
        'admin_token = "test-admin-token"',
        f'run_dir = "{directory / "run"}"',
        "[redis]",
        f"port = {ports[0]}",
        "[gateway]",
        f"port = {ports[1]}",
        f"gossip_port = {ports[2]}",
        "handshake_timeout_s = 1.0",
        "rate_limit_per_s = 1000000.0  # closed-loop tests and benchmarks go as fast as they can",
        "max_sessions_per_address = 100000  # every test client comes from 127.0.0.1",
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
    for section in ("[cluster]", "[gateway]"):  # sections the base config has: merge
        if section in extra_sections:
            overrides = extra_sections.pop(section)
            keys = {line.split("=")[0].strip() for line in overrides}
            at = lines.index(section) + 1
            end = next((i for i in range(at, len(lines)) if lines[i].startswith("[")), len(lines))
            kept = [line for line in lines[at:end] if line.split("=")[0].strip() not in keys]
            lines = lines[:at] + overrides + kept + lines[end:]
    for header, body in extra_sections.items():
        lines += [header, *body]
    for i in range(nodes + standby):
        link, admin, gossip = ports[3 + 3 * i : 6 + 3 * i]
        lines += [
            "[[nodes]]",
            f'name = "n{i + 1}"',
            f"link_port = {link}",
            f"admin_port = {admin}",
            f"gossip_port = {gossip}",
            f"standby = {'true' if i >= nodes else 'false'}",
        ]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
