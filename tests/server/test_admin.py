"""Admin routes: token, loopback-only, health open to all."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from prometheus_client import CollectorRegistry
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from server.admin import AdminRefused, admin_routes


class FakeConn:
    """Just enough of a ServerConnection for process_request: an address and respond()."""

    def __init__(self, peer: str) -> None:
        self.remote_address = (peer, 40000)

    def respond(self, status: int, text: str) -> Response:
        headers = Headers([("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
        return Response(status, "", headers, text.encode())


def drain(query):
    if query.get("force") != "1":
        raise AdminRefused("the last node serving")
    return {"draining": True}


def routes(**kw):
    return admin_routes(
        status=lambda: {"ok": 1},
        health=lambda: (True, "ok"),
        registry=CollectorRegistry(),
        websocket_path="/ws",
        actions={"drain": drain},
        admin_token="t0ken",
        **kw,
    )


def request(path: str, token: str | None = None) -> Request:
    headers = Headers()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return Request(path, headers)


@pytest.mark.parametrize(
    "peer, path, token, status",
    [
        ("127.0.0.1", "/admin/drain?force=1", "t0ken", 200),
        ("127.0.0.1", "/admin/drain", "t0ken", 409),  # the action refused, with its reason
        ("127.0.0.1", "/admin/drain", "wrong", 401),
        ("127.0.0.1", "/admin/drain", None, 401),
        ("127.0.0.1", "/status", None, 200),
        ("203.0.113.9", "/status", None, 403),
        ("203.0.113.9", "/admin/drain?force=1", "t0ken", 403),
        ("203.0.113.9", "/healthz", None, 200),
        ("::1", "/metrics", None, 200),
    ],
)
def test_loopback_only_admin(peer, path, token, status):
    response = asyncio.run(routes(loopback_only=True)(FakeConn(peer), request(path, token)))
    assert response.status_code == status


@pytest.mark.parametrize("peer, status", [("10.0.9.7", 200), ("10.0.8.7", 403), ("127.0.0.1", 200)])
def test_admin_networks_admit_their_peers(peer, status):
    networks = [ipaddress.ip_network("10.0.9.0/24")]
    handler = routes(loopback_only=True, admin_networks=networks)
    assert asyncio.run(handler(FakeConn(peer), request("/metrics"))).status_code == status


def test_websocket_path_passes_from_anywhere():
    assert asyncio.run(routes(loopback_only=True)(FakeConn("203.0.113.9"), request("/ws"))) is None
