"""`/healthz`, `/metrics` and `/status` over HTTP, served by websockets' handshake hook.

Nodes serve these on their admin port; the gateway serves them beside `/ws` on
its client port. No HTTP framework: `process_request` answers the request before
any WebSocket handshake happens.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

log = logging.getLogger("ringside.admin")

StatusFn = Callable[[], dict[str, Any]]
# The query's parameters -> the answer (or an awaitable of it).
ActionFn = Callable[[Mapping[str, str]], dict[str, Any] | Awaitable[dict[str, Any]]]


class AdminRefused(Exception):
    """An admin action that would do harm as asked: 409 with the reason."""


HealthFn = Callable[[], tuple[bool, str]]
PageFn = Callable[[ServerConnection, Request], Response | None]


def _respond(conn: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    response = conn.respond(status, "")
    response.body = body
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    return response


def http_response(conn: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    """An uncached response with `body`, for routes beside the admin ones (the dashboard)."""
    return _respond(conn, status, body, content_type)


def json_response(conn: ServerConnection, status: int, data: Any) -> Response:
    return _respond(conn, status, orjson.dumps(data, option=orjson.OPT_INDENT_2), "application/json")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_allowed(conn: ServerConnection, networks: Sequence[Network]) -> bool:
    peer = conn.remote_address[0] if conn.remote_address else ""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return address.is_loopback or any(address in network for network in networks)


def admin_routes(
    *,
    status: StatusFn,
    health: HealthFn,
    registry: CollectorRegistry,
    websocket_path: str | None = None,
    extra_websocket_paths: Collection[str] = (),
    pages: PageFn | None = None,
    actions: Mapping[str, ActionFn] | None = None,
    admin_token: str = "",
    loopback_only: bool = False,
    admin_networks: Sequence[Network] = (),
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    """A `process_request` hook: answers the admin paths, lets `websocket_path` through.

    `/admin/<action>` runs `actions[action](query)` when the request carries
    `Authorization: Bearer <admin_token>`; every attempt is logged with its peer.
    `extra_websocket_paths` also go through to the WebSocket handler (which must tell
    them apart by `connection.request.path`); `pages(conn, request)` may answer any
    other path (the gateway's dashboard) before the 404. With `loopback_only`, every path
    but `websocket_path` and `/healthz` answers 403 to peers outside 127.0.0.0/8, ::1 and
    `admin_networks`.
    """
    actions = actions or {}

    async def process_request(conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if websocket_path is not None and path == websocket_path:
            return None
        if loopback_only and path != "/healthz" and not _is_allowed(conn, admin_networks):
            return json_response(
                conn,
                HTTPStatus.FORBIDDEN,
                {"error": "admin paths answer loopback and [gateway] admin_networks only"},
            )
        if path in extra_websocket_paths:
            return None
        if path.startswith("/admin/"):
            name = path.removeprefix("/admin/")
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            peer = conn.remote_address[0] if conn.remote_address else "?"
            if not admin_token or not hmac.compare_digest(given.encode(), admin_token.encode()):
                log.warning("admin action refused", extra={"action": name, "peer": peer})
                return json_response(conn, HTTPStatus.UNAUTHORIZED, {"error": "admin token required"})
            action = actions.get(name)
            if action is None:
                return json_response(conn, HTTPStatus.NOT_FOUND, {"error": f"no admin action {name}"})
            query = {k: v[-1] for k, v in parse_qs(request.path.partition("?")[2]).items()}
            log.info("admin action", extra={"action": name, "peer": peer, "query": query})
            try:
                result = action(query)
                if inspect.isawaitable(result):
                    result = await result
                return json_response(conn, HTTPStatus.OK, result)
            except AdminRefused as exc:
                return json_response(conn, HTTPStatus.CONFLICT, {"error": str(exc)})
        if path == "/healthz":
            ok, detail = health()
            code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return json_response(conn, code, {"ok": ok, "detail": detail})
        if path == "/status":
            return json_response(conn, HTTPStatus.OK, status())
        if path == "/metrics":
            return _respond(conn, HTTPStatus.OK, generate_latest(registry), "text/plain; version=0.0.4")
        if pages is not None and (page := pages(conn, request)) is not None:
            return page
        return json_response(conn, HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    return process_request
