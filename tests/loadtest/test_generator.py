"""The bench generator's fixed-rate schedule (loadtest/bench.py `Generator.cmd_rate`), in
this process, against a websockets echo on 127.0.0.1: what it sends and how it counts."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve

from loadtest.bench import Generator
from tests.loadtest.conftest import Runner


async def echo_close_or_junk(ws: ServerConnection) -> None:
    """Echo. On /close the server closes (4003) after 5 messages; on /junk it sends bytes
    that are not JSON before its third echo."""
    path = ws.request.path if ws.request is not None else ""
    count = 0
    async for message in ws:
        count += 1
        if path == "/close" and count > 5:
            await ws.close(4003, "replaced")
            return
        if path == "/junk" and count == 3:
            await ws.send(b"not json")
        await ws.send(message)


async def rate_phase(
    sessions: int, rate: float, seconds: float, paths: dict[int, str] | None = None
) -> dict[str, Any]:
    async with serve(echo_close_or_junk, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        gen = Generator()
        for i in range(sessions):
            path = (paths or {}).get(i, "/ws")
            await gen.open_one(f"ws://127.0.0.1:{port}{path}", None, f"p{i}", update=False)
        result = await gen.cmd_rate({"rate": rate, "seconds": seconds, "warmup": 0.2})
        assert gc.isenabled() and gen.lat is None and gen.measure_from == 0.0
        await gen.cmd_close({})
        return result


def test_every_session_sends_at_its_rate_and_every_reply_is_counted(run: Runner) -> None:
    result = run(rate_phase(sessions=20, rate=400.0, seconds=1.0))
    # 20 sessions at 20/s each for 1 s: 400 sends, give or take one per session at the edges.
    assert abs(result["sent"] - 400) <= 20, result
    assert result["answered"] == result["sent"]
    assert result["unanswered"] == 0 and result["errors"] == 0
    assert result["lat"]["n"] == result["answered"]
    assert result["exact_send_times"] is sys.platform.startswith("linux")
    assert result["fragments"] == 0


def test_a_session_the_server_closes_counts_as_an_error_and_the_rest_go_on(run: Runner) -> None:
    result = run(rate_phase(sessions=10, rate=200.0, seconds=1.0, paths={0: "/close", 1: "/close"}))
    # Each closed session: its sixth request (and any sent before the close arrived) is
    # unanswered; its next send fails, an error, and stays unanswered too.
    assert result["errors"] == 2, result
    assert result["unanswered"] >= 4
    assert result["sent"] == result["answered"] + result["unanswered"]
    assert result["answered"] >= 150  # the 8 others (20/s each) and the closed ones' first five
    assert result["seconds"] < 4.0  # the end waits for open sessions' replies, not for these


def test_a_reply_that_is_not_json_is_an_error_and_the_session_goes_on(run: Runner) -> None:
    result = run(rate_phase(sessions=4, rate=80.0, seconds=1.0, paths={0: "/junk"}))
    assert result["errors"] == 1, result
    assert result["unanswered"] == 0
    assert result["answered"] == result["sent"] > 60


def test_a_cancelled_phase_leaves_the_generator_ready_for_the_next() -> None:
    async def main() -> None:
        async with serve(echo_close_or_junk, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            gen = Generator()
            await gen.open_one(f"ws://127.0.0.1:{port}/ws", None, "p0", update=False)
            phase = asyncio.ensure_future(gen.cmd_rate({"rate": 50.0, "seconds": 10.0, "warmup": 0.0}))
            await asyncio.sleep(0.3)
            phase.cancel()
            with pytest.raises(asyncio.CancelledError):
                await phase
            assert gc.isenabled() and gen.lat is None and gen.measure_from == 0.0
            result = await gen.cmd_rate({"rate": 50.0, "seconds": 0.5, "warmup": 0.1})
            assert result["answered"] == result["sent"] > 0
            await gen.cmd_close({})

    uvloop.run(main())
