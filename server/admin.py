"""`/healthz`, `/metrics` and `/status` over HTTP, served by websockets' handshake hook.

Nodes serve these on their admin port; the gateway serves them beside `/ws` on
its client port. No HTTP framework: `process_request` answers the request before
any WebSocket handshake happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

StatusFn = Callable[[], dict[str, Any]]
HealthFn = Callable[[], tuple[bool, str]]


def _respond(conn: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    response = conn.respond(status, "")
    response.body = body
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    return response


def json_response(conn: ServerConnection, status: int, data: Any) -> Response:
    return _respond(conn, status, orjson.dumps(data, option=orjson.OPT_INDENT_2), "application/json")


def admin_routes(
    *,
    status: StatusFn,
    health: HealthFn,
    registry: CollectorRegistry,
    websocket_path: str | None = None,
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    """A `process_request` hook: answers the admin paths, lets `websocket_path` through."""

    async def process_request(conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if websocket_path is not None and path == websocket_path:
            return None
        if path == "/healthz":
            ok, detail = health()
            code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return json_response(conn, code, {"ok": ok, "detail": detail})
        if path == "/status":
            return json_response(conn, HTTPStatus.OK, status())
        if path == "/metrics":
            return _respond(conn, HTTPStatus.OK, generate_latest(registry), "text/plain; version=0.0.4")
        return json_response(conn, HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    return process_request
