"""An asyncio Ringside client, for tests, load tests and bots.

    async with await RingsideClient.connect(url, token) as client:
        result = await client.request("player.update", {"incr": {"xp": 1}})

Requests may be pipelined: `request()` can be awaited from many tasks at once;
replies are matched by id. Pushes (`{"ev": ...}`) land in `client.events`.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class RequestFailed(Exception):
    """The server answered `"ok": false`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HelloFailed(Exception):
    def __init__(self, code: str, message: str, close_code: int | None) -> None:
        super().__init__(f"{code}: {message} (close {close_code})")
        self.code = code
        self.close_code = close_code


class RingsideClient:
    def __init__(self, ws: ClientConnection, welcome: dict[str, Any], max_events: int) -> None:
        self.ws = ws
        self.welcome = welcome
        self.player: str = welcome["player"]
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_events)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed_with: int | None = None

    @classmethod
    async def connect(
        cls, url: str, token: str, *, max_events: int = 10_000, open_timeout: float = 10.0
    ) -> RingsideClient:
        ws = await connect(url, compression=None, open_timeout=open_timeout, max_size=2**20)
        await ws.send(orjson.dumps({"op": "hello", "token": token}), text=True)
        try:
            first = orjson.loads(await ws.recv(decode=False))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise HelloFailed("closed", "closed during hello", code) from exc
        if first.get("op") != "welcome":
            error = first.get("error", {})
            code = None
            try:
                await ws.wait_closed()
                code = ws.close_code
            finally:
                raise HelloFailed(error.get("code", "?"), error.get("message", ""), code)
        return cls(ws, first, max_events)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if "ev" in msg:
                    if not self.events.full():
                        self.events.put_nowait(msg)
                    continue
                future = self._waiting.pop(msg.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(msg)
        except ConnectionClosed:
            pass
        finally:
            self.closed_with = self.ws.close_code
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"closed ({self.ws.close_code})"))
            self._waiting.clear()

    async def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return the whole reply frame (ok or not)."""
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        frame: dict[str, Any] = {"id": request_id, "op": op}
        if args is not None:
            frame["args"] = args
        try:
            await self.ws.send(orjson.dumps(frame), text=True)
        except ConnectionClosed as exc:
            self._waiting.pop(request_id, None)
            raise ConnectionError(f"closed ({self.ws.close_code})") from exc
        return await future

    async def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request; return its result or raise RequestFailed."""
        reply = await self.call(op, args)
        if not reply.get("ok"):
            error = reply.get("error", {})
            raise RequestFailed(error.get("code", "?"), error.get("message", ""))
        return reply.get("result")

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> RingsideClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
