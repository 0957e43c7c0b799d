"""The bench generator's fixed-rate schedule (loadtest/bench.py `Generator.cmd_rate`), in
this process, against a websockets echo on 127.0.0.1: what it sends and how it counts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve

from loadtest.bench import Generator

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def echo_or_close(ws: ServerConnection) -> None:
    """Echo; a connection opened on /close is closed by the server (4003) after 5 messages."""
    closing = ws.request is not None and ws.request.path == "/close"
    count = 0
    async for message in ws:
        count += 1
        if closing and count > 5:
            await ws.close(4003, "replaced")
            return
        await ws.send(message)


async def rate_phase(sessions: int, closing: int, rate: float, seconds: float) -> dict[str, Any]:
    async with serve(echo_or_close, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        gen = Generator()
        for i in range(sessions):
            path = "/close" if i < closing else "/ws"
            await gen.open_one(f"ws://127.0.0.1:{port}{path}", None, f"p{i}", update=False)
        result = await gen.cmd_rate({"rate": rate, "seconds": seconds, "warmup": 0.2})
        await gen.cmd_close({})
        return result


@pytest.mark.parametrize("loop", LOOPS)
def test_every_session_sends_at_its_rate_and_every_reply_is_counted(loop: str) -> None:
    result = LOOPS[loop](rate_phase(sessions=20, closing=0, rate=400.0, seconds=1.0))
    # 20 sessions at 20/s each for 1 s: 400 sends, give or take one per session at the edges.
    assert abs(result["sent"] - 400) <= 20, result
    assert result["answered"] == result["sent"]
    assert result["unanswered"] == 0 and result["errors"] == 0
    assert result["lat"]["n"] == result["answered"]
    assert result["exact_send_times"] is sys.platform.startswith("linux")
    assert result["fragments"] == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_session_the_server_closes_counts_as_an_error_and_the_rest_go_on(loop: str) -> None:
    result = LOOPS[loop](rate_phase(sessions=10, closing=2, rate=200.0, seconds=1.0))
    # Each closed session: its sixth request unanswered; its next send fails, an error, and
    # stays unanswered too (sent, errors and unanswered count as the generator always has).
    assert result["errors"] == 2, result
    assert result["unanswered"] == 4
    assert result["answered"] >= 150  # the 8 others (20/s each) and the closed ones' first five
