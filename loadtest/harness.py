"""Scratch clusters on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import socket
from pathlib import Path


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
