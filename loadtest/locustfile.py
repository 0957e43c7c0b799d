"""Locust scenario: game clients against a running Ringside cluster (`make loadtest`).

    make up
    make loadtest USERS=200 RATE=10 DURATION=60s [CHAOS=kill:n2@20]
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 400 -r 100 -t 60s --processes 2

Each user is one game client over `websocket-client` (blocking sockets, which locust's
gevent monkey-patching turns cooperative): `hello` with a token minted from the cluster
secret of `RINGSIDE_CONFIG` (default `configs/local.toml`), then a game. Users are grouped
`RINGSIDE_GAME_SIZE` (8) per game: the first of a group creates it, the others join it by
the id it publishes in a module-level registry (per locust process). Then, open loop at
`RINGSIDE_RATE` Hz (10): a `player.update` of the position each tick, and now and then a
`game.action` (score about every 2 s, chat about every 5 s). A reader greenlet per user
reads replies and pushes.

Reported to locust's statistics (`events.request.fire`, request_type `ws`):
- every request, named by op, timed from send to reply (failures: `ok: false` with the
  error code, timeout after `RINGSIDE_TIMEOUT_S` (10), or the connection closing);
- `game.event echo`: a push's delivery delay. Pushes carry no timestamp, so it is
  measured on the user's own actions: from sending the `game.action` to receiving the
  `game.event` with the seq the reply returned;
- `hello` (connect + handshake), and `connection` failures with the close code.

Chaos (`RINGSIDE_CHAOS`, comma-separated, e.g. `kill:n2@20`, `pause:n2@20`, `drain:n2@20`):
at that second from the test start the master (or the local runner) SIGKILLs the node,
SIGSTOPs it for `RINGSIDE_PAUSE_S` (6) seconds, or runs `ringside drain n2`. The chaos
action itself shows in the report as request_type `chaos` (timed: how long the kill,
pause or drain took). Its window is the requests sent from the start of its second through
`RINGSIDE_STALL_WINDOW_S` (5) seconds after it. Once they have all been answered or timed out
(`RINGSIDE_TIMEOUT_S` later, plus a worker report's interval under `--processes`), a second
`chaos` row, `<action> <node>: longest stall`, carries the longest of them as its response
time and their count as its content size, and fails, saying how many, if any of them
failed: the HTML and CSV reports show it if the test runs on for window + timeout + ~6 s
(21 s by default) after the event. Neither `chaos` row counts in locust's `Aggregated`
line (a 6 s pause is not a 6 s request). The summary printed at the end says the same per event:
how many were sent, how many failed, the longest (and warns when the test ended too soon).
With `--processes`, workers ship per-second buckets to the master with their stats reports.

Refused at once, with a message and exit 1: a setting that is not a positive number, a
chaos node the config does not have, a chaos second at or past `-t`, and a gateway that
does not answer `/healthz`. A run in which planned chaos did not happen exits 1.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import subprocess
import sys
import time
from typing import Any, NoReturn
from urllib.parse import urlsplit

import gevent
import orjson
import websocket  # websocket-client
from gevent.event import AsyncResult
from locust import User, constant_pacing, events, task
from locust.runners import WORKER_REPORT_INTERVAL, LocalRunner, MasterRunner, WorkerRunner
from locust.stats import StatsError

from server.cluster import LocalCluster, http_json
from server.config import ConfigError, load_config
from server.tokens import mint

log = logging.getLogger("ringside.locust")


def env_number(name: str, default: float, *, whole: bool = False) -> Any:
    """A positive number from the environment; a usage error (not a traceback) otherwise."""
    raw = os.environ.get(name) or ""
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise SystemExit(f"{name}: expected {'a whole' if whole else 'a'} number, got {raw!r}") from None
    if not 0 < value < math.inf:
        raise SystemExit(f"{name}: expected a positive number, got {raw!r}")
    return value


CONFIG_PATH = os.environ.get("RINGSIDE_CONFIG") or "configs/local.toml"
try:
    CONFIG = load_config(CONFIG_PATH)
except ConfigError as err:
    raise SystemExit(f"RINGSIDE_CONFIG: {err}") from None
URL = os.environ.get("RINGSIDE_URL") or f"ws://{CONFIG.gateway.host}:{CONFIG.gateway.port}/ws"
RATE = env_number("RINGSIDE_RATE", 10.0)
GAME_SIZE = env_number("RINGSIDE_GAME_SIZE", 8, whole=True)
TIMEOUT_S = env_number("RINGSIDE_TIMEOUT_S", 10.0)
PAUSE_S = env_number("RINGSIDE_PAUSE_S", 6.0)
STALL_WINDOW_S = env_number("RINGSIDE_STALL_WINDOW_S", 5.0)
CHAOS = os.environ.get("RINGSIDE_CHAOS") or ""
SCORE_EVERY_S = 2.0
CHAT_EVERY_S = 5.0
MAX_IN_FLIGHT = 64  # per user; past it a tick is skipped (counted as `skipped`)
RUN_TAG = f"{int(time.time()) % 1_000_000:06d}"

_user_ids = itertools.count()
_games: dict[int, AsyncResult] = {}  # group -> AsyncResult(game id or None)

# Per-second buckets by *send* wall time: sec -> [requests, failures, max latency ms].
_buckets: dict[int, list[float]] = {}
_chaos_log: list[dict[str, Any]] = []  # master/local only
_others_pushes = 0
_skipped = 0  # ticks skipped because MAX_IN_FLIGHT requests were unanswered


def _bucket(sent_wall: float, latency_ms: float, failed: bool) -> None:
    b = _buckets.get(int(sent_wall))
    if b is None:
        if len(_buckets) > 7200:  # bound: two hours of seconds
            for key in sorted(_buckets)[:3600]:
                del _buckets[key]
        b = _buckets[int(sent_wall)] = [0, 0, 0.0]
    b[0] += 1
    if failed:
        b[1] += 1
    if latency_ms > b[2]:
        b[2] = latency_ms


def _fire(
    name: str,
    started: float,
    sent_wall: float,
    *,
    exc: Exception | None = None,
    size: int = 0,
    request_type: str = "ws",
) -> None:
    ms = (time.perf_counter() - started) * 1000.0
    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=ms,
        response_length=size,
        exception=exc,
        context={},
    )
    _bucket(sent_wall, ms, exc is not None)


class ServerClosed(Exception):
    """The server closed the socket, with this close code (None: no code given)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed by the server ({code})")
        self.code = code


class RingsideError(Exception):
    pass


class GameClient(User):
    wait_time = constant_pacing(1.0 / RATE)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.index = next(_user_ids)
        self.player = f"ls{RUN_TAG}p{os.getpid()}u{self.index}"
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.ids = itertools.count(1)
        # id -> (op, perf start, wall start, AsyncResult | None)
        self.pending: dict[int, tuple[str, float, float, AsyncResult | None]] = {}
        self.echo_wait: dict[int, tuple[float, float]] = {}  # event seq -> (perf, wall) of the send
        self.early_echo: dict[int, float] = {}  # event seq -> perf when its push came before the reply
        self.action_sent: dict[int, tuple[float, float]] = {}  # request id -> (perf, wall)
        self.game: str | None = None
        self.next_score = time.monotonic() + random.uniform(0, SCORE_EVERY_S)
        self.next_chat = time.monotonic() + random.uniform(0, CHAT_EVERY_S)
        self.reconnect_at = 0.0

    # -- connection -------------------------------------------------------
    def connect(self) -> bool:
        started, wall = time.perf_counter(), time.time()
        token = mint(CONFIG.secret_bytes, self.player, expires_at=int(time.time()) + 86_400)
        try:
            ws = websocket.create_connection(URL, timeout=TIMEOUT_S, enable_multithread=True)
            ws.send(orjson.dumps({"op": "hello", "token": token}).decode())
            welcome = orjson.loads(ws.recv())
            if welcome.get("op") != "welcome":
                ws.close()
                raise RingsideError(f"hello refused: {welcome.get('error')}")
            ws.settimeout(None)
        except Exception as exc:  # noqa: BLE001 - every failure is a reported failure
            _fire("hello", started, wall, exc=exc)
            self.reconnect_at = time.monotonic() + 1.0
            return False
        _fire("hello", started, wall)
        self.ws = ws
        self.reader = gevent.spawn(self._read, ws)
        return True

    def _read(self, ws: websocket.WebSocket) -> None:
        global _others_pushes
        try:
            while True:
                opcode, raw = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:  # raw: a 2-byte code, then the reason
                    raise ServerClosed(int.from_bytes(raw[:2], "big") if len(raw) >= 2 else None)
                now = time.perf_counter()
                msg = orjson.loads(raw)
                if "ev" in msg:
                    data = msg.get("data") or {}
                    if msg["ev"] == "game.event" and data.get("from") == self.player:
                        self._echo(data.get("seq"), now)
                    else:
                        _others_pushes += 1
                    continue
                entry = self.pending.pop(msg.get("id"), None)
                if entry is None:
                    continue
                op, started, wall, waiter = entry
                ok = bool(msg.get("ok"))
                exc = None
                if not ok:
                    err = msg.get("error") or {}
                    exc = RingsideError(f"{err.get('code')}: {err.get('message')}")
                _fire(op, started, wall, exc=exc, size=len(raw))
                if waiter is not None:
                    waiter.set(msg)
                if op == "game.action" and ok:
                    seq = (msg.get("result") or {}).get("seq")
                    early = self.early_echo.pop(seq, None)
                    if early is not None:
                        self._fire_echo(started, wall, early)
                    elif seq is not None:
                        self.echo_wait[seq] = (started, wall)
        except Exception as exc:  # noqa: BLE001 - closed socket or garbage: report and reconnect
            if self.ws is ws:
                code = exc.code if isinstance(exc, ServerClosed) else None
                _fire(
                    "connection",
                    time.perf_counter(),
                    time.time(),
                    exc=RingsideError(f"connection lost: {exc!r} (close {code})"),
                )
                self._drop(ws, f"connection lost: {exc!r}")

    def _echo(self, seq: Any, now: float) -> None:
        sent = self.echo_wait.pop(seq, None)
        if sent is not None:
            self._fire_echo(sent[0], sent[1], now)
        elif isinstance(seq, int) and len(self.early_echo) < 1024:
            self.early_echo[seq] = now

    def _fire_echo(self, started: float, wall: float, received: float) -> None:
        ms = (received - started) * 1000.0
        events.request.fire(
            request_type="push",
            name="game.event echo",
            response_time=ms,
            response_length=0,
            exception=None,
            context={},
        )
        _bucket(wall, ms, False)

    def _drop(self, ws: websocket.WebSocket, reason: str) -> None:
        if self.ws is ws:
            self.ws = None
        with contextlib.suppress(Exception):
            ws.close(timeout=0.1)
        for op, started, wall, waiter in self.pending.values():
            _fire(op, started, wall, exc=RingsideError(reason))
            if waiter is not None:
                waiter.set({"ok": False, "error": {"code": "closed"}})
        self.pending.clear()
        self.echo_wait.clear()
        self.early_echo.clear()
        self.reconnect_at = time.monotonic() + 0.5

    def send(self, op: str, args: dict[str, Any], *, wait: bool = False) -> dict[str, Any] | None:
        ws = self.ws
        if ws is None:
            return None
        rid = next(self.ids)
        waiter = AsyncResult() if wait else None
        started, wall = time.perf_counter(), time.time()
        self.pending[rid] = (op, started, wall, waiter)
        try:
            ws.send(orjson.dumps({"id": rid, "op": op, "args": args}).decode())
        except Exception as exc:  # noqa: BLE001
            self._drop(ws, f"send failed: {exc!r}")
            return None
        if waiter is None:
            return None
        try:
            return waiter.get(timeout=TIMEOUT_S)
        except gevent.Timeout:
            return None

    def expire(self) -> None:
        now = time.perf_counter()
        late = [rid for rid, entry in self.pending.items() if now - entry[1] > TIMEOUT_S]
        for rid in late:
            op, started, wall, waiter = self.pending.pop(rid)
            _fire(op, started, wall, exc=RingsideError(f"timeout after {TIMEOUT_S:g}s"))
            if waiter is not None:
                waiter.set({"ok": False, "error": {"code": "timeout"}})
        stale = [seq for seq, (started, _) in self.echo_wait.items() if now - started > TIMEOUT_S]
        for seq in stale:
            started, wall = self.echo_wait.pop(seq)
            events.request.fire(
                request_type="push",
                name="game.event echo",
                response_time=TIMEOUT_S * 1000,
                response_length=0,
                exception=RingsideError("own game.event never arrived"),
                context={},
            )
            _bucket(wall, TIMEOUT_S * 1000, True)
        if len(self.early_echo) > 512:
            self.early_echo.clear()

    # -- the game ---------------------------------------------------------
    def join_game(self) -> None:
        group, first = divmod(self.index, GAME_SIZE)
        slot = _games.setdefault(group, AsyncResult())
        if first == 0:
            reply = self.send("game.create", {"mode": "locust", "max_players": GAME_SIZE}, wait=True)
            self.game = (reply or {}).get("result", {}).get("game") if reply and reply.get("ok") else None
            slot.set(self.game)
            return
        try:
            game = slot.get(timeout=TIMEOUT_S + 5)
        except gevent.Timeout:
            game = None
        if game is not None:
            reply = self.send("game.join", {"game": game}, wait=True)
            if reply and reply.get("ok"):
                self.game = game
                return
        # No game to join (creator failed or group full): play in one of our own.
        reply = self.send("game.create", {"mode": "locust", "max_players": GAME_SIZE}, wait=True)
        if reply and reply.get("ok"):
            self.game = reply["result"]["game"]

    def on_start(self) -> None:
        if self.connect():
            self.join_game()

    def on_stop(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close(timeout=1)
        if self.reader is not None:
            self.reader.kill(block=False)

    @task
    def tick(self) -> None:
        if self.ws is None:
            if time.monotonic() >= self.reconnect_at and self.connect() and self.game is None:
                self.join_game()
            return
        self.expire()
        if len(self.pending) >= MAX_IN_FLIGHT:
            global _skipped
            _skipped += 1
            return
        position = [round(random.uniform(-100, 100), 2) for _ in range(3)]
        self.send("player.update", {"set": {"position": position}})
        now = time.monotonic()
        if self.game is not None and now >= self.next_score:
            self.next_score = now + SCORE_EVERY_S * random.uniform(0.5, 1.5)
            self.send("game.action", {"game": self.game, "action": {"type": "score", "points": 1}})
        elif self.game is not None and now >= self.next_chat:
            self.next_chat = now + CHAT_EVERY_S * random.uniform(0.5, 1.5)
            self.send("game.action", {"game": self.game, "action": {"type": "chat", "text": "gg wp"}})


# -- chaos (master or local runner) ------------------------------------------


def parse_chaos(spec: str) -> list[tuple[str, str, float]]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            action, rest = part.split(":", 1)
            node, at = rest.split("@", 1)
            if action not in ("kill", "pause", "drain") or not 0 <= float(at) < math.inf:
                raise ValueError(action)
            out.append((action, node, float(at)))
        except ValueError:
            raise SystemExit(  # noqa: B904 - a usage error, not a chained one
                f"RINGSIDE_CHAOS: cannot parse {part!r}; expected kill|pause|drain:NODE@SECONDS"
            )
        # What LocalCluster.kill/pause accept (`_check_process_name`); drain takes nodes only.
        known = CONFIG.all_node_names + ([] if action == "drain" else ["gateway", "redis"])
        if node not in known:
            raise SystemExit(
                f"RINGSIDE_CHAOS: {part!r}: no process named {node!r} to {action} in {CONFIG_PATH} "
                f"(have {', '.join(known)})"
            )
    return out


CHAOS_PLAN = parse_chaos(CHAOS)


def _chaos(environment: Any, action: str, node: str, at: float, t0: float) -> None:
    gevent.sleep(max(0.0, t0 + at - time.time()))
    cluster = LocalCluster(CONFIG, CONFIG_PATH, progress=lambda msg: log.info(msg))
    wall = time.time()
    entry: dict[str, Any] = {
        "action": action,
        "node": node,
        "at_s": at,
        "wall": wall,
        "settle_s": _settle_s(wall, isinstance(environment.runner, MasterRunner)),
    }
    _chaos_log.append(entry)
    print(f"[chaos] {action} {node} at t={time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    started = time.perf_counter()
    exc: Exception | None = None
    try:
        if action == "kill":
            cluster.kill(node)
        elif action == "pause":
            cluster.pause(node, PAUSE_S)
        else:
            cmd = [sys.executable, "-m", "server.cli", "--config", CONFIG_PATH, "drain", node]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                said = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
                raise RuntimeError(
                    f"`ringside drain {node}` failed (exit {proc.returncode}; is drain implemented?): "
                    f"{said[-1][:200]}"
                )
    except Exception as err:  # noqa: BLE001
        exc = err
        entry["error"] = str(err)
        print(f"[chaos] {action} {node} FAILED: {err}", file=sys.stderr, flush=True)
        log.error("chaos %s %s failed: %s", action, node, err)
    entry["took_s"] = time.perf_counter() - started
    _log_chaos(environment, f"{action} {node}", entry["took_s"] * 1000, 0, exc)
    gevent.sleep(max(0.0, entry["wall"] + entry["settle_s"] - time.time()))
    _fire_stall(environment, entry)


def _log_chaos(environment: Any, name: str, ms: float, size: int, exc: Exception | None) -> None:
    """A `chaos` row, logged as `events.request` would but left out of `stats.total`: the
    "Aggregated" line counts the clients' requests only (a 6 s pause is not a 6 s request)."""
    stats = environment.stats
    stats.get(name, "chaos").log(ms, size)
    if exc is not None:
        stats.get(name, "chaos").log_error(exc)
        key = StatsError.create_key("chaos", name, exc)
        stats.errors.setdefault(key, StatsError("chaos", name, exc)).occurred()


def _settle_s(wall: float, distributed: bool) -> float:
    """Seconds from a chaos event until every request sent in its window has been answered
    or has timed out (the user's tick expires it), and, under --processes, the workers'
    reports (every WORKER_REPORT_INTERVAL s) have brought that to the master."""
    margin = 0.5 + (WORKER_REPORT_INTERVAL + 1.0 if distributed else 0.0)
    return _window(wall)[1] + TIMEOUT_S + margin - wall


def _window(wall: float) -> tuple[int, int]:
    """The seconds (of send time) the window of a chaos event at `wall` spans: from the one
    it happened in through STALL_WINDOW_S after it; [first, end)."""
    return int(wall), int(wall + STALL_WINDOW_S) + 1


def _chaos_window(entry: dict[str, Any]) -> tuple[int, int, float]:
    """Requests sent in a chaos event's window: how many, how many failed, and the longest
    (ms)."""
    first, end = _window(entry["wall"])
    window = [b for sec, b in _buckets.items() if first <= sec < end]
    return (
        int(sum(b[0] for b in window)),
        int(sum(b[1] for b in window)),
        max((b[2] for b in window), default=0.0),
    )


def _fire_stall(environment: Any, entry: dict[str, Any]) -> None:
    """The window's longest request as a `chaos` row of its own, so that the HTML and CSV
    reports show the stall (and as a failure, how many requests in the window failed)."""
    if entry.get("stall_reported"):
        return
    entry["stall_reported"] = True
    sent, failed, worst = _chaos_window(entry)
    _log_chaos(
        environment,
        f"{entry['action']} {entry['node']}: longest stall",
        worst,
        sent,
        RingsideError(f"{failed} of {sent} requests failed") if failed else None,
    )


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    """Refuse at once, before a user spawns, what would otherwise fail only later or all the
    run long."""
    if isinstance(environment.runner, WorkerRunner):
        return
    run_time = getattr(environment.parsed_options, "run_time", None)
    for action, node, at in CHAOS_PLAN:
        if run_time and at >= run_time:
            _refuse(
                environment,
                f"RINGSIDE_CHAOS: {action} {node}@{at:g} would never happen: the test runs {run_time}s (-t)",
            )
    url = urlsplit(URL)
    where = f"{url.hostname}:{url.port or (443 if url.scheme == 'wss' else 80)}"
    scheme = "https" if url.scheme == "wss" else "http"
    if http_json(f"{scheme}://{where}/healthz", timeout=2.0)[0] == 0:
        _refuse(
            environment,
            f"the gateway at {where} does not answer; is the cluster up (`make up` or `make run`)?",
        )


def _refuse(environment: Any, message: str) -> NoReturn:
    """Exit with `message`. SystemExit: locust logs any other exception from a listener with a
    traceback. A master first tells its workers (those of --processes connect within a second)
    to quit: else they wait a minute for it, and `--processes` waits for them."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        expected = getattr(environment.parsed_options, "expect_workers", 1)
        deadline = time.monotonic() + 5
        while len(runner.clients.ready) < expected and time.monotonic() < deadline:
            gevent.sleep(0.1)
        runner.quit()
    raise SystemExit(message)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not CHAOS_PLAN:
        return
    t0 = time.time()
    for action, node, at in CHAOS_PLAN:
        gevent.spawn(_chaos, environment, action, node, at, t0)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any]) -> None:
    data["ringside_buckets"] = {str(k): v for k, v in _buckets.items()}
    global _others_pushes, _skipped
    data["ringside_others_pushes"] = _others_pushes
    data["ringside_skipped"] = _skipped
    _others_pushes = _skipped = 0  # workers ship deltas
    _buckets.clear()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any]) -> None:
    global _others_pushes, _skipped
    _others_pushes += data.get("ringside_others_pushes", 0)
    _skipped += data.get("ringside_skipped", 0)
    for key, (n, failed, worst) in data.get("ringside_buckets", {}).items():
        b = _buckets.setdefault(int(key), [0, 0, 0.0])
        b[0] += n
        b[1] += failed
        b[2] = max(b[2], worst)


def chaos_summary() -> list[str]:
    lines = []
    for entry in _chaos_log:
        sent, failed, worst = _chaos_window(entry)
        if "error" in entry:
            status = f"FAILED: {entry['error']}"
        elif "took_s" in entry:
            status = f"done in {entry['took_s']:.2f}s"
        else:
            status = "still running"
        lines.append(
            f"chaos {entry['action']} {entry['node']} @{entry['at_s']:g}s ({status}): "
            f"requests sent from its second through {STALL_WINDOW_S:g}s after it: {sent}, failed {failed}, "
            f"longest stall {worst:.0f} ms"
        )
        if entry.get("stall_late"):
            lines.append(
                "  (the test ended before this window settled, so the figures may miss requests "
                "still in flight and the HTML/CSV reports may lack its stall row: run at least "
                f"{entry['settle_s'] + 1:.0f}s past the event)"  # +1: locust's CSV writes once a second
            )
    return lines


_printed = False


def _print_summary(environment: Any) -> None:
    global _printed
    if _printed or isinstance(environment.runner, WorkerRunner):
        return
    _printed = True
    for entry in _chaos_log:
        if not entry.get("stall_reported"):  # the test ended before its window settled
            entry["stall_late"] = True
            _fire_stall(environment, entry)
    clients = [e for (_, kind), e in environment.stats.entries.items() if kind != "chaos"]
    requests = sum(e.num_requests for e in clients)
    failures = sum(e.num_failures for e in clients)
    lines = [
        "ringside locust summary:",
        f"  url {URL}, rate {RATE:g} Hz per user, {GAME_SIZE} players per game",
        f"  requests {requests}, failures {failures}, pushes from other players "
        f"{_others_pushes}, ticks skipped at the in-flight bound ({MAX_IN_FLIGHT}) {_skipped}",
    ]
    lines += ["  " + line for line in chaos_summary()]
    ran = [(e["action"], e["node"], e["at_s"]) for e in _chaos_log]
    for action, node, at in (planned for planned in CHAOS_PLAN if planned not in ran):
        lines.append(
            f"  chaos {action} {node} @{at:g}s was planned but did not run (the test ended before it)"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    # A master gets the workers' last reports after test_stop: it prints at quitting.
    if isinstance(environment.runner, LocalRunner):
        _print_summary(environment)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        _print_summary(environment)
    # Here, not at test_stop: on SIGTERM locust picks the exit code before it stops the runner.
    if not isinstance(environment.runner, WorkerRunner) and len(_chaos_log) < len(CHAOS_PLAN):
        environment.process_exit_code = 1
