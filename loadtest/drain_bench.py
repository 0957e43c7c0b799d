"""Drain benchmark: how long draining a node holding ~10,000 active player actors takes, the
pause each live session on it sees while it moves, and whether anything was lost, for each
hand-off mode (`[node] handoff`): "live" (live migration) and "redis" (the Redis hand-off).

    .venv/bin/python -m loadtest.drain_bench [--runs 3] [--actors 10000] [--sessions 200]
        [--handoff live,redis] [--interval 0.1]

Every run builds a fresh scratch cluster on 127.0.0.1 (embedded Redis, 3 nodes, gateway) in a
temporary directory and tears it down afterwards; its config gets `[node] handoff = "<mode>"`.
The runs alternate between the modes of `--handoff` (run 1 live, run 2 redis, run 3 live, ...;
`--runs` is runs per mode), so both are measured in one invocation on the same machine under
the same background load. Nothing here asserts on timing: it reports figures (a progress line
per step, a table with a row per run, then one JSON line as the last line of output).

1. Activate `--actors` player actors on the victim (`--victim`, default n2): players whose
   owner on the 3-node ring is the victim (`HashRing(nodes).owner("player:<id>")`, the key
   the gateway uses) connect in concurrent batches, send one `player.update {"incr":
   {"xp": 1}}` each and close. The session closes; the actor stays active (idle_timeout_s
   300). The victim's /status `actors` is checked. If activation does not finish within
   `--activate-timeout`, the run measures with the actors it has, and says so.
2. `--sessions` other players owned by the victim increment `xp` in a closed loop (ack
   timestamps recorded). Then `LocalCluster.drain(victim)`: POST /admin/drain, wait for the
   process to exit. Reported: the time drain() returns, the node's own `drain finished`
   elapsed_s (its log), phases from its log (drain started -> first hand-off), and from a
   /status poller: when `dirty` first reads 0 and when `actors` / `sessions` reach 0.
3. Pause per live session: the longest gap between two consecutive acks that overlaps the
   drain window [drain called, drain returned] (a session that is never answered again
   counts as the whole remaining window). p50 / p99 / max over sessions, next to the same
   figure for an equally long window just before the drain (the closed loop's own jitter).
   Stall per live session: the longest request (send to ack) that was waiting during the
   drain, next to the same figure just before it. In a closed loop that saturates the 2
   cores, every gap includes a round trip under that load; `--interval 0.1` makes the
   sessions 10 Hz game clients instead, and the stall is then the pause itself.
4. Correctness once every running node reports `dirty == 0`: every live player's stored xp
   (`rs:{player:<id>}:state`) equals its acknowledged increments, every activation player's
   equals 1 (its one acknowledged increment); lost / doubled / disconnected counts.

The two modes, as the node implements them (server/node.py `_drain`, server/migration.py):
both first flush every dirty actor to Redis. With "live" the draining node then ships each
actor's state to its owner in the ring without it, which adopts it under a fresh epoch, and
the actor's sessions are told to move (MOVED) before the node leaves the ring; what is not
migrated within `migration_timeout_s` goes the Redis way. With "redis" the node leaves the
ring, the gateway re-pins its sessions, the node writes what they changed meanwhile, and new
owners load the actors from Redis on first use. Per run: the mode, the migrated count (the
victim's `drain finished` / `migrated actors` log lines) and the sum of `adopted` on the other
nodes' /status after the drain. The summary aggregates per mode, plus the live/redis ratio of
the medians of drain() and of the per-run pause p99 (below 1: live was shorter). With few runs
on a shared machine these ratios are noisy; read them next to each mode's per-run figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

import orjson

from gateway.client import HelloFailed, RingsideClient
from loadtest.checker import PlayerLoad
from loadtest.failover_bench import Scratch, TimedLoad, close_run, fmt, say
from loadtest.harness import write_config
from server.cluster import LocalCluster, pid_alive
from server.config import load_config
from server.ring import HashRing

TARGETS = {"drain_s": 2.0, "pause_p99_ms": 100.0}
ANCHORS = [
    (
        "Orleans",
        "no drain API; grains are deactivated on silo shutdown (state lost in the "
        "reactivation race, dotnet/orleans #5687)",
    ),
    ("Akka cluster sharding", "entities are stopped on handoff and restarted on the new node"),
    ("Dapr actors", "reloaded from the state store after a 2 s drain timeout (drainOngoingCallTimeout)"),
    ("Colyseus", "graceful shutdown can wait forever, or exit before saves finish"),
]
HANDOFF_MODES = ("live", "redis")
HANDOFF_NOTE = (
    "each run's cluster config sets [node] handoff: \"live\" ships each actor's state and a fresh "
    "epoch node to node before the draining node leaves the ring (what does not migrate in time "
    'goes the Redis way); "redis" flushes, leaves the ring, and new owners load from Redis on '
    "next use. Runs alternate between the modes; ratios are live median / redis median"
)


class DrainLoad(TimedLoad):
    """TimedLoad whose clients connect with a bounded concurrency and retry a refused hello
    (a burst of hellos can get `unavailable`, see activation_failures)."""

    async def start(self) -> None:
        sem = asyncio.Semaphore(50)

        async def connect(token: str) -> RingsideClient:
            async with sem:
                for attempt in range(5):
                    try:
                        return await RingsideClient.connect(self.url, token)
                    except HelloFailed:
                        if attempt == 4:
                            raise
                        self.hello_retries += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                raise AssertionError("unreachable")

        self.hello_retries = 0
        clients = await asyncio.gather(*(connect(t) for t in self.tokens.values()))
        for player, client in zip(self.tokens, clients, strict=True):
            self.players[player] = PlayerLoad(client)
        self._tasks = [asyncio.create_task(self._run(p)) for p in self.players.values()]


def activation_warnings(scratch: Scratch) -> dict[str, Any]:
    """`activation failed` warnings in every node log: count and distinct errors."""
    count, errors = 0, Counter[str]()
    for name in scratch.config.node_names:
        try:
            text = scratch.local.log_file(name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if '"activation failed"' in line:
                count += 1
                with contextlib.suppress(orjson.JSONDecodeError):
                    errors[str(orjson.loads(line).get("error"))[:120]] += 1
    return {"activation_failed_logged": count, "activation_failed_errors": dict(errors.most_common(3))}


# -- helpers ----------------------------------------------------------------------------------


def with_node_setting(extra: str, key: str, value: str) -> str:
    """`extra` (TOML sections for write_config) with `key = value` in its [node] section:
    set in the [node] table it already has (replacing `key` there), else a new [node] table,
    so the written config never holds two [node] tables."""
    setting = f"{key} = {value}"
    lines = extra.strip().splitlines()
    if "[node]" not in (line.strip() for line in lines):
        return "\n".join([*lines, "[node]", setting]).strip() + "\n"
    out: list[str] = []
    section = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            out.append(line)
            if section == "[node]":
                out.append(setting)
        elif section == "[node]" and stripped.split("=")[0].strip() == key:
            continue  # replaced by `setting`
        else:
            out.append(line)
    return "\n".join(out) + "\n"


class DrainScratch(Scratch):
    """A Scratch cluster whose config sets `[node] handoff` (written before anything starts)."""

    def __init__(self, label: str, handoff: str, extra: str = "") -> None:
        super().__init__(label)
        self.handoff = handoff
        # Rewrite the config in the same scratch dir, then load it the way Scratch does.
        self.config_path = write_config(
            self.dir, nodes=3, extra=with_node_setting(extra, "handoff", f'"{handoff}"')
        )
        self.config = load_config(self.config_path, env={})
        self.local = LocalCluster(self.config, str(self.config_path), progress=lambda _msg: None)
        g = self.config.gateway
        self.url = f"ws://{g.host}:{g.port}/ws"


def victim_players(ring: HashRing, victim: str, prefix: str, count: int, limit: int) -> list[str]:
    """The first `count` ids `<prefix><i>` the ring gives to `victim` (bounded search)."""
    out: list[str] = []
    for i in range(limit):
        p = f"{prefix}{i}"
        if ring.owner(f"player:{p}") == victim:
            out.append(p)
            if len(out) == count:
                break
    return out


async def activate(
    scratch: Scratch, players: list[str], *, concurrency: int, timeout: float
) -> dict[str, Any]:
    """Connect each player, one increment, close. Bounded by `timeout`; returns counts."""
    acked: dict[str, bool] = {}
    failures: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout
    started = time.monotonic()

    async def one(player: str) -> None:
        async with sem:
            if time.monotonic() > deadline:
                return
            client = None
            try:
                client = await RingsideClient.connect(scratch.url, scratch.token(player), open_timeout=10)
                reply = await asyncio.wait_for(client.call("player.update", {"incr": {"xp": 1}}), 10)
                acked[player] = bool(reply.get("ok"))
                if not reply.get("ok"):
                    failures.append(f"{player}: {reply.get('error')}")
            except Exception as exc:  # noqa: BLE001 - counted, reported
                failures.append(f"{player}: {type(exc).__name__}: {exc}")
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.close(), 5)

    last = 0.0
    batch = 1000
    todo = list(players)
    for attempt in range(1, 4):  # failed hellos (e.g. `unavailable` under the burst) are retried
        for i in range(0, len(todo), batch):
            if time.monotonic() > deadline:
                break
            await asyncio.gather(*(one(p) for p in todo[i : i + batch]))
            now = time.monotonic()
            if now - last >= 5 or i + batch >= len(todo):
                last = now
                say(
                    f"    activated {sum(acked.values())}/{len(players)} in {now - started:.1f}s "
                    f"(attempt {attempt}, {len(failures)} failures so far)"
                )
        todo = [p for p in players if not acked.get(p)]
        if not todo or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    return {
        "acked": acked,
        "failures": failures,
        "seconds": time.monotonic() - started,
        "timed_out": time.monotonic() > deadline and sum(acked.values()) < len(players),
    }


class StatusPoller(threading.Thread):
    """Polls the victim's /status every `period` s until its process exits (bounded)."""

    def __init__(self, scratch: Scratch, name: str, pid: int, t0: float, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.scratch, self.name, self.pid, self.t0, self.period = scratch, name, pid, t0, period
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.halt.is_set() and pid_alive(self.pid) and time.monotonic() < deadline:
            s = self.scratch.status(self.name, timeout=0.5)
            if s is not None:
                self.samples.append((time.monotonic() - self.t0, s))
            time.sleep(self.period)

    def first(self, pred: Any) -> float | None:
        for t, s in self.samples:
            if s.get("state") == "draining" and pred(s):
                return round(t, 3)
        return None


def parse_drain_log(path: Any) -> dict[str, Any]:
    """From the node's JSON log: drain started / first hand-off / migrated actors / drain
    finished."""
    out: dict[str, Any] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out

    def ts(entry: dict[str, Any]) -> float | None:
        try:
            return datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
        except (KeyError, ValueError):
            return None

    started = finished = None
    handoffs = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            e = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        ev = e.get("event")
        if ev == "drain started":
            started = ts(e)
            out["log_actors_at_start"] = e.get("actors")
            out["log_sessions_at_start"] = e.get("sessions")
        elif ev == "handed off actors" and started is not None:
            # Now logged as migrated + via_redis; older nodes logged `actors`.
            count = e.get("actors")
            if count is None and ("migrated" in e or "via_redis" in e):
                count = int(e.get("migrated") or 0) + int(e.get("via_redis") or 0)
            handoffs.append((ts(e), count, e.get("moving")))
        elif ev == "migrated actors":  # handoff "live" only
            out["log_migrated"] = e.get("migrated")
            out["migration_left"] = e.get("left")
            out["migration_s"] = e.get("elapsed_s")
        elif ev == "node stopped" and finished is not None:
            stopped_ts = ts(e)
            if stopped_ts is not None:
                out["stop_after_finish_s"] = round(stopped_ts - finished, 3)
        elif ev == "drain finished":
            finished = ts(e)
            out["node_elapsed_s"] = e.get("elapsed_s")
            out["migrated"] = e.get("migrated")
            out["drain_handed_off"] = e.get("handed_off")
            out["left_actors"] = e.get("left_actors")
            out["left_sessions"] = e.get("left_sessions")
            out["final_flush_ok"] = e.get("flushed")
        elif e.get("level") in ("error", "critical") or "exc" in e:
            out.setdefault("log_errors", []).append(ev)
    if started is not None and handoffs and handoffs[0][0] is not None:
        out["first_handoff_s"] = round(handoffs[0][0] - started, 3)
        out["first_handoff_actors"] = handoffs[0][1]
        out["handoff_rounds"] = len(handoffs)
        out["handed_off_total"] = sum(h[1] or 0 for h in handoffs)
    if out.get("migrated") is None and out.get("log_migrated") is not None:
        out["migrated"] = out["log_migrated"]  # no `drain finished` line (e.g. killed)
    return out


def gap_over(times: list[float], t0: float, t1: float, t_end: float) -> tuple[float, float]:
    """Longest gap between consecutive acks that overlaps [t0, t1] (no ack after t1: up to
    t_end), and the time its last ack before the gap came."""
    worst, start = 0.0, t0
    prev = None
    answered_after = False
    for t in times:
        if prev is not None and t >= t0 and prev <= t1 and t - prev > worst:
            worst, start = t - prev, prev
        if t > t1:
            answered_after = True
            break
        prev = t
    if not answered_after:
        last = prev if prev is not None else t0
        if t_end - last > worst:
            worst, start = t_end - last, last
    return worst, start


def longest_request(sent: list[float], acks: list[float], t0: float, t1: float, t_end: float) -> float:
    """Longest time from send to ack of a request that was waiting at some point in [t0, t1]
    (answered at or after t0, sent at or before t1); a request sent before t1 and never
    answered counts up to t_end. `sent[i]` is the send time of the request acked at `acks[i]`."""
    worst = 0.0
    for s, a in zip(sent, acks, strict=False):
        if a >= t0 and s <= t1:
            worst = max(worst, a - s)
    if len(acks) == len(sent) and (not acks or acks[-1] <= t1):
        # No ack after the window: the session's request in flight waited until t_end.
        worst = max(worst, t_end - (acks[-1] if acks else t0))
    return worst


def pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(x: float | None) -> float | None:
    return None if x is None else (math.inf if math.isinf(x) else round(1000 * x, 1))


# -- one run ----------------------------------------------------------------------------------


async def drain_run(index: int, handoff: str, args: argparse.Namespace) -> dict[str, Any]:
    scratch = DrainScratch(f"drain{index}-{handoff}", handoff)
    victim = args.victim
    record: dict[str, Any] = {
        "run": index,
        "handoff": handoff,
        "handoff_config": scratch.config.node.handoff,  # as the nodes read the scratch config
        "victim": victim,
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    load: DrainLoad | None = None
    try:
        await asyncio.to_thread(scratch.local.up)
        ring = HashRing(scratch.config.node_names)
        actors = victim_players(ring, victim, f"a{index}x", args.actors, args.actors * 10)
        live = victim_players(ring, victim, f"s{index}x", args.sessions, args.sessions * 10)
        say(f"  run {index} [{handoff}]: cluster up; activating {len(actors)} actors on {victim} ...")

        act = await activate(scratch, actors, concurrency=args.concurrency, timeout=args.activate_timeout)
        acked_actors = [p for p, ok in act["acked"].items() if ok]
        vs = await asyncio.to_thread(scratch.status, victim)
        record.update(
            actors_requested=len(actors),
            actors_acked=len(acked_actors),
            activation_failures=len(act["failures"]),
            activation_failure_examples=act["failures"][:5],
            activation_s=round(act["seconds"], 1),
            activation_timed_out=act["timed_out"],
            victim_actors_before=(vs or {}).get("actors"),
        )
        say(
            f"  run {index}: {len(acked_actors)} actors acked in {act['seconds']:.1f}s; {victim} /status "
            f"actors={record['victim_actors_before']}"
            + (" (activation timed out: measuring with what is active)" if act["timed_out"] else "")
        )

        load = DrainLoad(scratch.url, {p: scratch.token(p) for p in live}, interval=args.interval)
        await asyncio.wait_for(load.start(), 60)
        await load.wait_for_acks(max(2000, 10 * len(live)), timeout=60)
        await asyncio.sleep(1.0)  # steady state
        vs = await asyncio.to_thread(scratch.status, victim)
        before = [await asyncio.to_thread(scratch.status, n) for n in scratch.running_nodes() if n != victim]
        record.update(
            adopted_before=sum(int((st or {}).get("adopted") or 0) for st in before),
            live_sessions=len(live),
            victim_sessions_before=(vs or {}).get("sessions"),
            victim_actors_at_drain=(vs or {}).get("actors"),
            victim_dirty_at_drain=(vs or {}).get("dirty"),
        )
        say(
            f"  run {index}: {len(live)} live sessions incrementing on {victim} "
            f"(sessions={record['victim_sessions_before']}, actors={record['victim_actors_at_drain']}); "
            f"draining {victim} ..."
        )

        pid = scratch.local.pid(victim)
        assert pid is not None
        t_pre = time.monotonic()
        poller = StatusPoller(scratch, victim, pid, t_pre)
        poller.start()
        scratch.local.progress = lambda msg: say("    " + msg.strip())
        t0 = time.monotonic()
        record["acks_per_s_before"] = round(load.acks_between(t0 - 1.0, t0))
        drain_s = await asyncio.to_thread(scratch.local.drain, victim)
        t1 = time.monotonic()
        scratch.local.progress = lambda _msg: None
        poller.halt.set()
        await asyncio.to_thread(poller.join, 5)
        record["drain_s"] = round(drain_s, 3)
        record["process_exited"] = not pid_alive(pid)

        # Let every moved session be answered again (bounded), then a little more load.
        moved = await _until(
            lambda: all(p.ack_times and p.ack_times[-1] > t1 for p in load.players.values()), 15
        )
        await asyncio.sleep(1.0)
        t_end = time.monotonic()
        record["all_answered_after"] = moved

        pauses = [gap_over(p.ack_times, t0, t1, t_end) for p in load.players.values()]
        gaps = [g for g, _ in pauses]
        starts = [st - t0 for _, st in pauses]
        ends = [st + g - t0 for g, st in pauses]
        width = t1 - t0
        base = [gap_over(p.ack_times, t0 - 1.0 - width, t0 - 1.0, t0)[0] for p in load.players.values()]
        stalls = [
            longest_request(load.sent_times.get(name, []), p.ack_times, t0, t1, t_end)
            for name, p in load.players.items()
        ]
        base_stalls = [
            longest_request(load.sent_times.get(name, []), p.ack_times, t0 - 1.0 - width, t0 - 1.0, t0)
            for name, p in load.players.items()
        ]
        record.update(
            interval_s=args.interval,
            stall_p50_ms=ms(pct(stalls, 0.5)),
            stall_p99_ms=ms(pct(stalls, 0.99)),
            stall_max_ms=ms(max(stalls) if stalls else None),
            baseline_stall_p99_ms=ms(pct(base_stalls, 0.99)),
            pause_p50_ms=ms(pct(gaps, 0.5)),
            pause_p99_ms=ms(pct(gaps, 0.99)),
            pause_max_ms=ms(max(gaps) if gaps else None),
            # When the pauses fall, relative to the drain call: last ack before, first ack after.
            pause_start_p50_ms=ms(pct(starts, 0.5)),
            pause_end_p50_ms=ms(pct(ends, 0.5)),
            pause_end_max_ms=ms(max(ends) if ends else None),
            baseline_gap_p50_ms=ms(pct(base, 0.5)),
            baseline_gap_p99_ms=ms(pct(base, 0.99)),
            baseline_gap_max_ms=ms(max(base) if base else None),
            dirty_zero_s=poller.first(lambda s: s.get("dirty") == 0),
            sessions_zero_s=poller.first(lambda s: s.get("sessions") == 0),
            actors_zero_s=poller.first(lambda s: s.get("actors") == 0),
            status_samples=len(poller.samples),
            max_dirty_seen=max((s.get("dirty", 0) for _, s in poller.samples), default=None),
        )
        record.update(parse_drain_log(scratch.local.log_file(victim)))
        record.update(activation_warnings(scratch))
        record["live_hello_retries"] = getattr(load, "hello_retries", 0)
        others: dict[str, dict[str, Any]] = {}
        for n in scratch.running_nodes():
            st = await asyncio.to_thread(scratch.status, n, 1.0)
            others[n] = st if st is not None else {}
        record["sessions_after"] = {n: s.get("sessions") for n, s in others.items()}
        record["actors_after"] = {n: s.get("actors") for n, s in others.items()}
        record["adopted_after_by_node"] = {n: s.get("adopted") for n, s in others.items()}
        record["adopted_after"] = sum(int(s.get("adopted") or 0) for s in others.values())
        # The victim's own counter, from the last /status it answered before exiting.
        record["victim_status_migrated_last"] = (
            poller.samples[-1][1].get("migrated") if poller.samples else None
        )

        record["stopped_cleanly"] = await load.stop_bounded()
        stopped, load = load, None
        record.update(await asyncio.to_thread(check, scratch, stopped, acked_actors))
    except Exception as exc:  # noqa: BLE001 - a failed run is a figure too
        record["error"] = f"{type(exc).__name__}: {exc}"
        scratch.keep = True
    finally:
        await close_run(record, scratch, load, keep=args.keep)
    return record


async def _until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def check(scratch: Scratch, load: TimedLoad, acked_actors: list[str]) -> dict[str, Any]:
    flushed = scratch.wait_flushed()
    mism = load.mismatches(scratch.stored_xp)
    # The activation players: one acknowledged increment each.
    r = scratch._redis
    assert r is not None  # opened by stored_xp above (or by mismatches on an empty load: open now)
    a_lost = a_doubled = 0
    examples: dict[str, Any] = {}
    for i in range(0, len(acked_actors), 1000):
        chunk = acked_actors[i : i + 1000]
        blobs = r.mget([f"rs:{{player:{p}}}:state" for p in chunk])
        for p, blob in zip(chunk, blobs, strict=True):
            xp = int(orjson.loads(blob).get("xp", 0)) if blob else 0
            if xp != 1:
                a_lost += xp < 1
                a_doubled += xp > 1
                if len(examples) < 5:
                    examples[p] = (1, xp)
    return {
        "flushed": flushed,
        "acked_total": load.total_acked,
        "lost": sum(1 for acked, stored in mism.values() if stored < acked),
        "doubled": sum(1 for acked, stored in mism.values() if stored > acked),
        "lost_updates": sum(acked - stored for acked, stored in mism.values() if stored < acked),
        "doubled_updates": sum(stored - acked for acked, stored in mism.values() if stored > acked),
        "mismatch_examples": dict(list(mism.items())[:5]),
        "actors_lost": a_lost,
        "actors_doubled": a_doubled,
        "actor_mismatch_examples": examples,
        "disconnected": len(load.disconnected()),
        "connection_errors": load.connection_errors,
        "errors": sum(p.errors for p in load.players.values()),
    }


# -- report -----------------------------------------------------------------------------------


AGG_KEYS = (
    "drain_s",
    "node_elapsed_s",
    "migration_s",
    "first_handoff_s",
    "dirty_zero_s",
    "actors_zero_s",
    "sessions_zero_s",
    "pause_p50_ms",
    "pause_p99_ms",
    "pause_max_ms",
    "baseline_gap_p99_ms",
    "stall_p50_ms",
    "stall_p99_ms",
    "stall_max_ms",
    "baseline_stall_p99_ms",
    "activation_s",
    "migrated",
    "adopted_after",
)
SUM_KEYS = (
    "lost",
    "doubled",
    "lost_updates",
    "doubled_updates",
    "actors_lost",
    "actors_doubled",
    "disconnected",
    "errors",
    "connection_errors",
    "activation_failures",
)


def summarize_mode(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The aggregates of a set of runs (one hand-off mode's)."""
    ok = [r for r in runs if "error" not in r and r.get("drain_s") is not None]

    def agg(key: str) -> dict[str, float | None]:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if not vals:
            return {"p50": None, "max": None}
        return {"p50": round(statistics.median(vals), 3), "max": round(max(vals), 3)}

    out: dict[str, Any] = {
        "runs": len(runs),
        "failed_runs": len(runs) - len(ok),
        "victim_actors_at_drain": [r.get("victim_actors_at_drain") for r in runs],
        "migrated_per_run": [r.get("migrated") for r in runs],
        "adopted_after_per_run": [r.get("adopted_after") for r in runs],
    }
    for key in AGG_KEYS:
        out[key] = agg(key)
    for key in SUM_KEYS:
        out[key] = sum(int(r.get(key) or 0) for r in runs)
    out["acked_total"] = sum(int(r.get("acked_total") or 0) for r in runs)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return None
    return round(a / b, 3)


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    by_handoff = {m: summarize_mode([r for r in runs if r.get("handoff") == m]) for m in modes}
    out: dict[str, Any] = {
        "runs": len(runs),
        "failed_runs": sum(s["failed_runs"] for s in by_handoff.values()),
        "targets": TARGETS,
        "handoff_modes": modes,
        "by_handoff": by_handoff,
    }
    if "live" in by_handoff and "redis" in by_handoff:
        live, red = by_handoff["live"], by_handoff["redis"]
        out["live_vs_redis"] = {
            "drain_s_p50": ratio(live["drain_s"]["p50"], red["drain_s"]["p50"]),
            "pause_p99_ms_p50": ratio(live["pause_p99_ms"]["p50"], red["pause_p99_ms"]["p50"]),
            "stall_p99_ms_p50": ratio(live["stall_p99_ms"]["p50"], red["stall_p99_ms"]["p50"]),
            "definition": "live median / redis median over this invocation's runs (below 1: live shorter)",
        }
    for key in SUM_KEYS:  # correctness over every run, whatever the mode
        out[key] = sum(int(r.get(key) or 0) for r in runs)
    out["acked_total"] = sum(int(r.get("acked_total") or 0) for r in runs)
    return out


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_n(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    say("")
    say("Drain of a node holding N active player actors while S live sessions on it increment xp")
    head = (
        f"{'run':>3} {'mode':<5} {'actors':>7} {'sess':>5} {'drain()':>8} {'node':>7} {'migr':>6} "
        f"{'mig end':>8} {'dirty=0':>8} {'actors=0':>8} {'pause p50':>9} {'p99':>7} {'max':>7} "
        f"{'base p99':>8} {'stall p99':>9} {'base':>7} {'lost/dbl/disc/err':>18}"
    )
    say(head)
    say("-" * len(head))
    for r in runs:
        if "error" in r:
            say(f"{r['run']:>3} {r.get('handoff', '?'):<5} FAILED: {r['error']}")
            continue
        lost = (r.get("lost") or 0) + (r.get("actors_lost") or 0)
        dbl = (r.get("doubled") or 0) + (r.get("actors_doubled") or 0)
        counts = f"{lost}/{dbl}/{r.get('disconnected')}/{r.get('errors')}"
        say(
            f"{r['run']:>3} {r.get('handoff', '?'):<5} {r.get('victim_actors_at_drain')!s:>7} "
            f"{r.get('victim_sessions_before')!s:>5} "
            f"{fmt(r.get('drain_s')):>8} {fmt(r.get('node_elapsed_s')):>7} "
            f"{fmt_n(r.get('migrated')):>6} {fmt(r.get('migration_s')):>8} "
            f"{fmt(r.get('dirty_zero_s')):>8} {fmt(r.get('actors_zero_s')):>8} "
            f"{fmt(r.get('pause_p50_ms'), 'ms'):>9} {fmt(r.get('pause_p99_ms'), 'ms'):>7} "
            f"{fmt(r.get('pause_max_ms'), 'ms'):>7} {fmt(r.get('baseline_gap_p99_ms'), 'ms'):>8} "
            f"{fmt(r.get('stall_p99_ms'), 'ms'):>9} {fmt(r.get('baseline_stall_p99_ms'), 'ms'):>7} "
            f"{counts:>18}"
        )
    say(f"targets: drain < {TARGETS['drain_s']}s, pause p99 < {TARGETS['pause_p99_ms']:.0f}ms.")
    for mode, s in summary["by_handoff"].items():
        say(
            f"  {mode:<5} ({s['runs'] - s['failed_runs']}/{s['runs']} runs ok): "
            f"drain() p50/max {fmt(s['drain_s']['p50'])}/{fmt(s['drain_s']['max'])}, "
            f"pause p99 p50/max {fmt(s['pause_p99_ms']['p50'], 'ms')}/{fmt(s['pause_p99_ms']['max'], 'ms')}, "
            f"stall p99 p50/max {fmt(s['stall_p99_ms']['p50'], 'ms')}/{fmt(s['stall_p99_ms']['max'], 'ms')}, "
            f"migrated p50 {fmt_n(s['migrated']['p50'])}, "
            f"adopted after p50 {fmt_n(s['adopted_after']['p50'])}"
        )
    if "live_vs_redis" in summary:
        lv = summary["live_vs_redis"]
        say(
            f"live vs redis: drain() {fmt_ratio(lv['drain_s_p50'])}, pause p99 "
            f"{fmt_ratio(lv['pause_p99_ms_p50'])} (live median / redis median; below 1: live shorter)"
        )
    say(
        "mode: [node] handoff of the run's cluster; drain(): LocalCluster.drain from the admin call to "
        "process exit;\nnode: the node's own 'drain finished' elapsed_s; migr: actors it migrated node "
        "to node ('drain finished'); mig end:\ndrain start -> 'migrated actors' logged (live only); "
        "dirty=0 / actors=0: first /status poll (50 ms) with\ndirty 0 / actors 0; pause: per live "
        "session, longest gap between consecutive acks spanning the drain;\nbase p99: same gap measure "
        "over an equally long window just before the drain (the closed loop's own jitter);\nstall: per "
        "live session, the longest request (send to ack) waiting during the drain; base: the same just "
        "before it."
    )
    say(f"note: {HANDOFF_NOTE}.")
    say("")
    say("Anchors:")
    for name, figure in ANCHORS:
        say(f"  {name:<22} {figure}")


def meminfo_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


async def main_async(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    runs = []
    modes: list[str] = args.handoff
    total = args.runs * len(modes)
    for i in range(1, total + 1):
        mode = modes[(i - 1) % len(modes)]  # alternate: live, redis, live, ...
        r = await drain_run(i, mode, args)
        runs.append(r)
        if "error" in r:
            say(f"run {i}/{total} [{mode}]: FAILED {r['error']}")
        else:
            say(
                f"run {i}/{total} [{mode}]: {r.get('victim_actors_at_drain')} actors + "
                f"{r.get('victim_sessions_before')} sessions on {r['victim']}: drain() "
                f"{fmt(r.get('drain_s'))} (node {fmt(r.get('node_elapsed_s'))}), migrated "
                f"{r.get('migrated')}, adopted {r.get('adopted_after')}, "
                f"pause p50/p99/max {fmt(r.get('pause_p50_ms'), 'ms')}/{fmt(r.get('pause_p99_ms'), 'ms')}/"
                f"{fmt(r.get('pause_max_ms'), 'ms')}; lost {r.get('lost')}+{r.get('actors_lost')} doubled "
                f"{r.get('doubled')}+{r.get('actors_doubled')} disconnected {r.get('disconnected')} "
                f"errors {r.get('errors')}, exited {r.get('process_exited')}"
            )
    return runs, summarize(runs, modes)


def handoff_list(text: str) -> list[str]:
    """`--handoff`: a comma list of modes, each once, in the order given."""
    modes: list[str] = []
    for part in text.split(","):
        mode = part.strip()
        if mode not in HANDOFF_MODES:
            raise argparse.ArgumentTypeError(f"{mode!r}: use a comma list of {', '.join(HANDOFF_MODES)}")
        if mode not in modes:
            modes.append(mode)
    return modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.drain_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--runs", type=int, default=3, help="runs per hand-off mode, each on a fresh cluster (default 3)"
    )
    ap.add_argument(
        "--handoff",
        type=handoff_list,
        default=list(HANDOFF_MODES),
        help="comma list of [node] handoff modes to alternate between (default live,redis)",
    )
    ap.add_argument("--actors", type=int, default=10_000, help="player actors to activate on the victim")
    ap.add_argument("--sessions", type=int, default=200, help="live closed-loop sessions on the victim")
    ap.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds each live session waits after an ack before its next request (default 0: a "
        "closed loop that saturates the machine; 0.1: a 10 Hz game client)",
    )
    ap.add_argument("--victim", default="n2", help="node to drain (default n2)")
    ap.add_argument("--concurrency", type=int, default=200, help="concurrent activation clients")
    ap.add_argument("--activate-timeout", type=float, default=300.0, help="bound on activation (s)")
    ap.add_argument("--keep", action="store_true", help="keep every scratch directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pacing = f"{args.interval}s between requests" if args.interval else "closed loop"
    say(
        f"drain bench: {args.runs} runs per mode x {','.join(args.handoff)}, {args.actors} actors + "
        f"{args.sessions} live sessions on {args.victim} ({pacing}); nproc {os.cpu_count()}, "
        f"memory {meminfo_gb()} GB"
    )
    say(f"note: {HANDOFF_NOTE}")
    if "RINGSIDE_NODE_HANDOFF" in os.environ:
        say(
            f"warning: RINGSIDE_NODE_HANDOFF={os.environ['RINGSIDE_NODE_HANDOFF']} is set and overrides "
            "each run's [node] handoff in the nodes it starts; unset it to compare the modes"
        )
    runs, summary = asyncio.run(main_async(args))
    print_table(runs, summary)
    out = {
        "machine": {"nproc": os.cpu_count(), "mem_gb": meminfo_gb(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([".venv/bin/python -m loadtest.drain_bench", *sys.argv[1:]]),
        "summary": summary,
        "runs": runs,
    }
    print(orjson.dumps(out, default=str).decode(), flush=True)


if __name__ == "__main__":
    main()
