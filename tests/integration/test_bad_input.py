"""Bad input gets a documented error frame or close code and never hurts another session."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from urllib.parse import urlsplit

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.client import HelloFailed, RingsideClient
from server.tokens import mint


async def hello_outcome(url: str, first: str | bytes | None) -> tuple[dict | None, int | None]:
    """Send `first` (or nothing) and return (error frame, close code)."""
    async with connect(url, compression=None) as ws:
        if first is not None:
            await ws.send(first)
        frame = None
        try:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass
        return frame, ws.close_code


def test_hello_refusals(cluster):
    expired = mint(cluster.config.secret_bytes, "x", expires_at=int(time.time()) - 1)
    forged = mint(b"not-the-secret", "x", expires_at=int(time.time()) + 60)
    cases = [
        ("not json", "bad_json", 4000),
        ('{"op": "player.get"}', "bad_hello", 4000),
        ('{"op": "hello"}', "unauthorized", 4001),
        (orjson.dumps({"op": "hello", "token": forged}).decode(), "unauthorized", 4001),
        (orjson.dumps({"op": "hello", "token": expired}).decode(), "unauthorized", 4001),
        (orjson.dumps({"op": "hello", "token": 42}).decode(), "unauthorized", 4001),
    ]

    async def main():
        for first, code, close in cases:
            frame, close_code = await hello_outcome(cluster.url, first)
            assert frame is not None and frame["error"]["code"] == code, (first, frame)
            assert close_code == close, (first, close_code)
        frame, close_code = await hello_outcome(cluster.url, None)  # says nothing
        assert frame["error"]["code"] == "handshake_timeout" and close_code == 4002

    asyncio.run(main())


def test_request_errors_keep_the_session(cluster):
    async def main():
        async with await RingsideClient.connect(cluster.url, cluster.token("bob")) as c:
            bad = [
                ("nope", {}, "unknown_op"),
                ("player.update", {"incr": {"xp": "1"}}, "bad_request"),
                ("player.update", {"incr": {"gold": 1}}, "bad_request"),
                ("player.update", {"set": {"name": 7}}, "bad_request"),
                ("player.update", {"set": {"inventory": ["x"] * 1000}}, "bad_request"),
                ("player.update", {"nonsense": 1}, "bad_request"),
                ("player.update", {}, "bad_request"),
                ("ping", {"x": 1}, "bad_request"),
                ("player.get", {"x": 1}, "bad_request"),
                ("hello", {}, "bad_request"),  # a second hello, after the welcome
            ]
            for op, args, code in bad:
                reply = await c.call(op, args)
                assert reply["ok"] is False and reply["error"]["code"] == code, (op, args, reply)
            # A half-valid update changes nothing.
            reply = await c.call("player.update", {"set": {"name": "ok"}, "incr": {"xp": "bad"}})
            assert not reply["ok"]
            state = await c.request("player.get")
            assert state["name"] == "bob" and state["xp"] == 0
            await c.send_raw("{not json")
            await c.send_raw('{"id": 5, "op": 3}')
            await c.send_raw('{"id": 6, "op": "ping", "args": [], "extra": 1}')
            assert await c.request("ping") == {"pong": True}
            assert c.closed_with is None

    asyncio.run(main())


def test_oversized_frame_is_closed_with_1009(cluster):
    async def main():
        c = await RingsideClient.connect(cluster.url, cluster.token("big"))
        with pytest.raises(ConnectionError):
            await c.call("player.update", {"set": {"name": "x" * 10_000}})
        assert c.ws.close_code == 1009
        await c.close()

    asyncio.run(main())


def test_newer_hello_replaces_the_older_session(cluster):
    async def main():
        first = await RingsideClient.connect(cluster.url, cluster.token("carol"))
        await first.request("player.update", {"incr": {"xp": 1}})
        second = await RingsideClient.connect(cluster.url, cluster.token("carol"))
        await first.ws.wait_closed()
        assert first.ws.close_code == 4003
        state = await second.request("player.update", {"incr": {"xp": 1}})
        assert state["xp"] == 2
        await second.close()
        await first.close()

    asyncio.run(main())


def test_hostile_clients_do_not_disturb_an_honest_one(cluster):
    acked = 0

    async def honest():
        nonlocal acked
        async with await RingsideClient.connect(cluster.url, cluster.token("honest")) as c:
            for _ in range(300):
                await c.request("player.update", {"incr": {"xp": 1}})
                acked += 1
            assert c.closed_with is None

    async def hostile(i: int):
        kinds = [b"\x00\xff" * 10, "x" * 9000, "[]", '{"op":"hello","token":"a.b"}']
        try:
            async with connect(cluster.url, compression=None, max_size=None) as ws:
                await ws.send(kinds[i % len(kinds)])
                await asyncio.wait_for(ws.wait_closed(), 5)
        except (ConnectionClosed, OSError):
            pass

    async def hostile_with_session(i: int):
        async with await RingsideClient.connect(cluster.url, cluster.token(f"h{i}")) as c:
            for _ in range(50):
                await c.send_raw("garbage")
                await c.send_raw('{"id": 1, "op": "player.update", "args": {"incr": {"xp": 1e309}}}')
            assert await c.request("ping") == {"pong": True}

    async def main():
        await asyncio.gather(
            honest(), *(hostile(i) for i in range(80)), *(hostile_with_session(i) for i in range(10))
        )

    asyncio.run(main())
    cluster.wait_flushed()
    assert cluster.stored_state("honest")["xp"] == acked == 300
    for name in cluster.local.process_names():
        assert cluster.local.pid(name) is not None, f"{name} died"


def test_a_flooding_client_is_closed_with_4006_and_others_are_not(make_cluster):
    # A flooding client is not read on once its close is under way (its close frame among
    # them): the socket ends at close_timeout_s.
    cluster = make_cluster(
        extra="[gateway]\nrate_limit_per_s = 20.0\nrate_limit_burst = 40.0\nclose_timeout_s = 1.0"
    )

    async def main():
        calm = await RingsideClient.connect(cluster.url, cluster.token("calm"))
        flood = await RingsideClient.connect(cluster.url, cluster.token("flood"))
        for _ in range(200):
            try:
                await flood.send_raw('{"id": 1, "op": "ping"}')
            except ConnectionClosed:
                break
        await flood.ws.wait_closed()
        assert flood.ws.close_code == 4006
        for _ in range(10):
            assert await calm.request("ping") == {"pong": True}
        assert calm.closed_with is None
        await calm.close()

        # Updates in a burst past the limit: a reply for each one applied, none for the rest.
        async with connect(cluster.url) as ws:
            await ws.send(orjson.dumps({"op": "hello", "token": cluster.token("burst")}).decode())
            assert orjson.loads(await ws.recv())["op"] == "welcome"
            update = {"op": "player.update", "args": {"incr": {"xp": 1}}}
            for i in range(1, 201):
                await ws.send(orjson.dumps({"id": i, **update}).decode())
            answered = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert reply["ok"], reply
                    answered.append(reply["id"])
        assert ws.close_code == 4006
        assert 40 <= len(answered) < 200
        assert answered == list(range(1, len(answered) + 1))
        again = await RingsideClient.connect(cluster.url, cluster.token("burst"))
        assert (await again.request("player.get"))["xp"] == len(answered)
        await again.close()

    asyncio.run(main())


def test_connections_per_address_are_capped(make_cluster):
    cluster = make_cluster(extra="[gateway]\nmax_sessions_per_address = 3")

    async def main():
        clients = [await RingsideClient.connect(cluster.url, cluster.token(f"a{i}")) for i in range(3)]
        with pytest.raises((ConnectionClosed, Exception)) as refused:
            await RingsideClient.connect(cluster.url, cluster.token("a3"))
        assert "1013" in str(refused.value)
        await clients[0].close()
        extra = None  # a slot frees once the gateway has seen the close
        deadline = time.monotonic() + 5
        while extra is None:
            try:
                extra = await RingsideClient.connect(cluster.url, cluster.token("a3"))
            except (HelloFailed, ConnectionClosed, OSError):
                assert time.monotonic() < deadline, "the freed slot was never reused"
                await asyncio.sleep(0.05)
        for c in [*clients[1:], extra]:
            await c.close()

    asyncio.run(main())


def test_origin_allow_list(make_cluster):
    cluster = make_cluster(extra='[gateway]\nallowed_origins = "https://game.example"')

    async def main():
        with pytest.raises(Exception) as refused:
            async with connect(cluster.url, origin="https://evil.example"):
                pass
        assert "403" in str(refused.value)
        async with connect(cluster.url, origin="https://game.example") as ws:
            await ws.send(orjson.dumps({"op": "hello", "token": cluster.token("o")}).decode())
            assert orjson.loads(await ws.recv())["op"] == "welcome"

    asyncio.run(main())


def test_a_revoked_token_is_refused(cluster):
    token = cluster.token("revokee")
    keep = cluster.token("revokee")
    subprocess.run(
        [".venv/bin/ringside", "--config", str(cluster.config_path), "revoke", token],
        check=True,
        capture_output=True,
    )

    async def main():
        frame, close_code = await hello_outcome(
            cluster.url, orjson.dumps({"op": "hello", "token": token}).decode()
        )
        assert frame["error"] == {"code": "unauthorized", "message": "token revoked"}
        assert close_code == 4001
        async with await RingsideClient.connect(cluster.url, keep) as c:  # other tokens still work
            assert await c.request("ping") == {"pong": True}

    asyncio.run(main())


async def slow_reader(url: str, token: str):
    """A client whose socket buffers little and that reads only when told to."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    ws = await connect(url, sock=sock, compression=None, max_queue=1)
    await ws.send(orjson.dumps({"op": "hello", "token": token}))
    assert orjson.loads(await ws.recv())["op"] == "welcome"
    return ws


def test_a_client_that_stops_reading_gets_its_replies_later_or_4004_past_the_bound(make_cluster):
    """Replies to a client that does not read queue at the gateway (the kernel buffers are
    small here) and reach it in order once it reads; past `max_outbound` it is closed 4004."""
    cluster = make_cluster(
        extra="[gateway]\nmax_outbound = 64\nsocket_send_buffer = 4096\n"
        "rate_limit_per_s = 10000.0\nrate_limit_burst = 10000.0"
    )
    inventory = {"id": 0, "op": "player.update", "args": {"set": {"inventory": ["i" * 60] * 50}}}

    async def big_replies(ws, count: int) -> None:
        """`count` requests whose replies are ~3 KB each, sent without reading them."""
        for i in range(count):
            await ws.send(orjson.dumps({"id": i, "op": "player.get"}))

    async def main():
        paused = await slow_reader(cluster.url, cluster.token("paused"))
        await paused.send(orjson.dumps(inventory))
        assert orjson.loads(await paused.recv())["ok"]
        # ~180 KB of replies: more than the socket buffers on both sides, fewer than 64
        # frames queued at the gateway.
        await big_replies(paused, 60)
        ids = [orjson.loads(await asyncio.wait_for(paused.recv(), 10))["id"] for _ in range(60)]
        assert ids == list(range(60))
        await paused.send(orjson.dumps({"id": "last", "op": "ping"}))
        assert orjson.loads(await asyncio.wait_for(paused.recv(), 10))["result"] == {"pong": True}
        await paused.close()

        stuck = await slow_reader(cluster.url, cluster.token("stuck"))
        await stuck.send(orjson.dumps(inventory))
        assert orjson.loads(await stuck.recv())["ok"]
        with contextlib.suppress(ConnectionClosed):
            await big_replies(stuck, 400)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.wait_for(stuck.recv(), 10)
        assert stuck.close_code == 4004

    asyncio.run(main())


def test_a_client_ahead_of_its_replay_bound_is_read_later_and_in_order(make_cluster):
    """A client that sends faster than its requests become durable fills its replay buffer
    (`max_replay`); the gateway stops reading it until there is room. Frames take two ways
    in (straight from the protocol callback while there is room, through the reader task
    when there is not): across every switch between them the requests must be applied in
    the order sent, none dropped, none twice. (The races at a switch are pinned down in
    tests/gateway/test_client_session.py.)"""
    cluster = make_cluster(extra="[gateway]\nmax_replay = 4\n")
    count = 60

    async def main():
        async with connect(cluster.url, compression=None) as ws:
            await ws.send(orjson.dumps({"op": "hello", "token": cluster.token("eager")}))
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["op"] == "welcome"
            for i in range(1, count + 1):
                args = {"incr": {"xp": 1}, "set": {"name": f"n{i}"}}
                # Text frames, as clients send them (a binary frame always takes the reader),
                # paced over a few flushes so the gateway switches ways more than once.
                await ws.send(orjson.dumps({"id": i, "op": "player.update", "args": args}), text=True)
                await asyncio.sleep(0.005)
            replies = [orjson.loads(await asyncio.wait_for(ws.recv(), 20)) for _ in range(count)]
        assert [r["id"] for r in replies] == list(range(1, count + 1))
        # Request i was the i-th applied: its reply sees xp == i and its own name.
        assert [(r["result"]["xp"], r["result"]["name"]) for r in replies] == [
            (i, f"n{i}") for i in range(1, count + 1)
        ]

    asyncio.run(main())
    cluster.wait_durable()
    assert cluster.stored_xp("eager") == count
