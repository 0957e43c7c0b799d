"""Failover benchmark: how long displaced sessions wait after SIGKILL / SIGSTOP, and whether
SWIM declares anyone faulty while the CPU is saturated.

    .venv/bin/python -m loadtest.failover_bench [--runs 5] [--players 200] [--burn-seconds 300]

Every run builds a fresh scratch cluster on 127.0.0.1 (embedded Redis, 3 nodes, gateway) in a
temporary directory and tears it down afterwards. Nothing here asserts on timing: it reports
figures (one progress line per run, a table, then one JSON line as the last line of output).

1. SIGKILL the node that owns the most players while `--players` clients increment `xp` in a
   closed loop. For each displaced player (its owner was the victim): the time from the kill
   until it is answered again, i.e. the first acknowledged increment of a request *sent* after
   the kill. (The first ack *received* after the kill is no measure: with ~30 ms round trips
   under this load, replies the victim sent just before it died arrive after the kill. It is
   kept in the JSON as `first_ack_*`.) The figure over-states by at most one round trip
   (`rtt_p50_ms_before`). Per run: max and p50 over displaced players. Who owns which player
   is computed from the ring and checked against the nodes' session counts
   (`placement_verified`).
2. SIGSTOP the same node for `--pause-seconds` (6), then SIGCONT (as LocalCluster.pause does,
   but signalled from the event loop so that t0 is the signal's instant); same measurement,
   plus how long the node takes to rejoin and the longest stall when sessions move back.
   After both, once every running node reports `dirty == 0`: stored xp vs acknowledged count
   (lost / doubled) and disconnected clients.
3. False positives: one cluster, a paced light load, a baseline window, then `--burn-procs`
   spinning processes for `--burn-seconds`; every member's `/status` is polled every 0.5 s and
   every `faulty` or `suspect` seen is counted (states seen and transitions from `recent`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import redis

from loadtest.checker import IncrementLoad, PlayerLoad
from loadtest.harness import write_config
from server.cluster import LocalCluster, http_json, pid_alive
from server.config import ClusterConfig, load_config
from server.ring import HashRing
from server.tokens import mint

ANCHORS = [
    ("Ringpop (defaults)", "8-9 s to drop a dead node"),
    ("hashicorp memberlist (LAN defaults)", "6-11 s"),
    ("Orleans (defaults)", "about 15 s"),
    ("Akka cluster (defaults)", "25-45 s"),
    ("Colyseus / Nakama", "the room or match is lost with its process"),
]
TARGETS = {"sigkill": 1.0, "sigstop": 3.0}


def say(msg: str) -> None:
    print(msg, flush=True)


# -- load -------------------------------------------------------------------------------------


class TimedLoad(IncrementLoad):
    """IncrementLoad that also keeps each acked request's send time, optionally paces requests,
    and ends a player's loop (counted) instead of raising when its socket closes."""

    def __init__(self, url: str, tokens: dict[str, str], *, interval: float = 0.0) -> None:
        super().__init__(url, tokens, record_times=True)
        self.interval = interval
        self.sent_times: dict[str, list[float]] = {}
        self.connection_errors = 0

    async def _run(self, load: PlayerLoad) -> None:
        sent = self.sent_times.setdefault(load.client.player, [])
        args = {"incr": {"xp": 1}}
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                reply = await load.client.call("player.update", args)
            except ConnectionError:
                self.connection_errors += 1
                return
            if reply.get("ok"):
                load.acked += 1
                load.ack_times.append(time.monotonic())
                sent.append(t)
            else:
                load.errors += 1
                await asyncio.sleep(0.05)
            if self.interval:
                await asyncio.sleep(self.interval)

    async def stop_bounded(self, timeout: float = 20.0) -> bool:
        """Stop every loop and close every client; False if it had to give up waiting."""
        try:
            await asyncio.wait_for(self.stop(), timeout)
            return True
        except Exception:  # noqa: BLE001 - timeout or a failed loop: close what is left
            await asyncio.gather(
                *(asyncio.wait_for(p.client.close(), 5) for p in self.players.values()),
                return_exceptions=True,
            )
            return False

    def acks_between(self, t0: float, t1: float) -> int:
        return sum(sum(1 for t in p.ack_times if t0 <= t < t1) for p in self.players.values())

    def recovery(self, player: str, t0: float) -> tuple[float, float]:
        """(first ack at/after t0, first ack of a request sent at/after t0), seconds after t0."""
        acks = self.players[player].ack_times
        sent = self.sent_times.get(player, [])
        first = next((a - t0 for a in acks if a >= t0), math.inf)
        strict = next((a - t0 for s, a in zip(sent, acks, strict=False) if s >= t0), math.inf)
        return first, strict

    def longest_gap(self, t0: float, t1: float, players: Iterable[str] | None = None) -> float:
        """Longest wait without an ack within [t0, t1] for any of `players` (all by default)."""
        worst = 0.0
        for name in players if players is not None else self.players:
            last = t0
            for t in self.players[name].ack_times:
                if t < t0:
                    continue
                if t > t1:
                    break
                worst = max(worst, t - last)
                last = t
            worst = max(worst, t1 - last)
        return worst

    def latencies(self, t0: float, t1: float) -> list[float]:
        out = []
        for name, p in self.players.items():
            for s, a in zip(self.sent_times.get(name, []), p.ack_times, strict=False):
                if t0 <= s < t1:
                    out.append(a - s)
        return out


# -- cluster helpers --------------------------------------------------------------------------


class Scratch:
    """A scratch cluster in a temporary directory, plus the checks the benchmark needs."""

    def __init__(self, label: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"ringside-bench-{label}-"))
        self.config_path = write_config(self.dir, nodes=3)
        self.config: ClusterConfig = load_config(self.config_path, env={})
        self.local = LocalCluster(self.config, str(self.config_path), progress=lambda _msg: None)
        g = self.config.gateway
        self.url = f"ws://{g.host}:{g.port}/ws"
        self._redis: redis.Redis | None = None
        self.keep = False
        self.stopped_pid: int | None = None

    def token(self, player: str) -> str:
        return mint(self.config.secret_bytes, player, expires_at=int(time.time()) + 3600)

    def status(self, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
        code, body = http_json(self.local.admin_url(name) + "/status", timeout=timeout)
        return body if code == 200 and isinstance(body, dict) else None

    def running_nodes(self) -> list[str]:
        return [n for n in self.config.node_names if self.local.pid(n) is not None]

    def wait_flushed(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = [self.status(n) for n in self.running_nodes()]
            if all(s is not None and s.get("dirty") == 0 for s in statuses):
                return True
            time.sleep(0.1)
        return False

    def stored_xp(self, player: str) -> int:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.config.redis.effective_url, socket_timeout=5)
        blob = self._redis.get(f"rs:{{player:{player}}}:state")
        return int(orjson.loads(blob).get("xp", 0)) if blob else 0

    def wait_member_state(self, observer: str, member: str, state: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(observer)
            if s and s.get("membership", {}).get("members", {}).get(member) == state:
                return True
            time.sleep(0.05)
        return False

    def wait_gone(self, name: str, pid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.local.pid_file(name).unlink(missing_ok=True)

    def resume_at(self, pid: int, at: float) -> None:
        """SIGCONT a SIGSTOPped process at monotonic time `at`."""
        try:
            time.sleep(max(0.0, at - time.monotonic()))
        finally:
            self._cont()

    def _cont(self) -> None:
        pid, self.stopped_pid = self.stopped_pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        self._cont()
        try:
            self.local.down()
        except Exception as exc:  # noqa: BLE001 - teardown must not hide the figures
            say(f"  teardown of {self.dir} failed: {exc!r}")
            self.keep = True
        if self._redis is not None:
            self._redis.close()
        if self.keep:
            say(f"  kept {self.dir} (logs in {self.dir / 'run'})")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def invariants(scratch: Scratch, load: TimedLoad) -> dict[str, Any]:
    flushed = scratch.wait_flushed()
    mism = load.mismatches(scratch.stored_xp)
    return {
        "flushed": flushed,
        "acked_total": load.total_acked,
        "lost": sum(1 for acked, stored in mism.values() if stored < acked),
        "doubled": sum(1 for acked, stored in mism.values() if stored > acked),
        "lost_updates": sum(acked - stored for acked, stored in mism.values() if stored < acked),
        "doubled_updates": sum(stored - acked for acked, stored in mism.values() if stored > acked),
        "mismatch_examples": dict(list(mism.items())[:5]),
        "disconnected": len(load.disconnected()),
        "connection_errors": load.connection_errors,
        "errors": sum(p.errors for p in load.players.values()),
    }


# How the gateway keys a player on the ring: `player:<id>` since games share the ring; plain
# `<id>` before. The benchmark checks which one matches the nodes' session counts.
RING_KEYS = ("player:{}", "{}")


def placement(scratch: Scratch, players: list[str]) -> tuple[dict[str, str], bool]:
    """Each player's owner node, and whether that matches every node's /status session count."""
    ring = HashRing(scratch.config.node_names)
    sessions = {n: (scratch.status(n) or {}).get("sessions") for n in scratch.config.node_names}
    first: dict[str, str] | None = None
    for form in RING_KEYS:
        owners = {p: ring.owner(form.format(p)) for p in players}
        first = first or owners
        counts = Counter(owners.values())
        if all(sessions[n] == counts.get(n, 0) for n in scratch.config.node_names):
            return owners, True
    assert first is not None
    return first, False


def membership_events(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((status or {}).get("membership", {}).get("recent", []))


# -- scenarios 1 and 2 ------------------------------------------------------------------------


async def failover_run(kind: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    scratch = Scratch(f"{kind}{index}")
    record: dict[str, Any] = {"scenario": kind, "run": index, "loadavg_1m_at_start": os.getloadavg()[0]}
    load: TimedLoad | None = None
    try:
        await asyncio.to_thread(scratch.local.up)
        players = [f"b{i}" for i in range(args.players)]
        load = TimedLoad(scratch.url, {p: scratch.token(p) for p in players})
        await asyncio.wait_for(load.start(), 30)
        await load.wait_for_acks(max(2000, 10 * len(players)), timeout=30)
        await asyncio.sleep(1.0)  # steady state

        owners, verified = await asyncio.to_thread(placement, scratch, players)
        counts = Counter(owners.values())
        victim = max(scratch.config.node_names, key=lambda n: counts[n])
        displaced = [p for p in players if owners[p] == victim]
        record.update(
            victim=victim, displaced=len(displaced), players=len(players), placement_verified=verified
        )
        if not verified:
            say(f"  warning: predicted placement {dict(counts)} does not match the nodes' session counts")

        pid = scratch.local.pid(victim)
        if pid is None:
            raise RuntimeError(f"{victim} is not running before the fault")
        pause_task: asyncio.Task[None] | None = None
        # Signal from the event-loop thread right after taking t0 (what LocalCluster.kill/pause
        # do, minus their bookkeeping): a signal sent from a worker thread lagged t0 by tens of
        # ms under this load (GIL), and the victim went on answering requests sent "after" t0.
        t0, wall0 = time.monotonic(), time.time()
        if kind == "sigkill":
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(scratch.wait_gone, victim, pid)
            window = 30.0
        else:
            os.kill(pid, signal.SIGSTOP)
            scratch.stopped_pid = pid
            pause_task = asyncio.create_task(
                asyncio.to_thread(scratch.resume_at, pid, t0 + args.pause_seconds)
            )
            window = args.pause_seconds + 30.0
        record["acks_per_s_before"] = round(load.acks_between(t0 - 1.0, t0) / 1.0)
        before = sorted(load.latencies(t0 - 1.0, t0))
        record["rtt_p50_ms_before"] = round(1000 * before[len(before) // 2], 1) if before else None
        served = await until(
            lambda: all((sent := load.sent_times.get(p)) and sent[-1] >= t0 for p in displaced),
            window,
        )
        record["all_served_again"] = served
        t_served = time.monotonic()
        record["served_during_pause"] = served and kind == "sigstop" and t_served - t0 < args.pause_seconds

        if pause_task is not None:
            await pause_task
            t_cont = time.monotonic()
            rejoined = await asyncio.to_thread(scratch.wait_member_state, "gateway", victim, "alive", 20.0)
            record["rejoin_s"] = round(time.monotonic() - t_cont, 3) if rejoined else None
            # Let sessions move back to the rejoined node and settle.
            await load.wait_for_acks(1000, timeout=30)
            await asyncio.sleep(2.0)
            t_end = time.monotonic()
            record["moveback_stall_max_s"] = round(load.longest_gap(t_cont, t_end), 3)
            vs = await asyncio.to_thread(scratch.status, victim)
            record["victim_dropped_all"] = (vs or {}).get("dropped_all_activations")
            record["victim_sessions_after"] = (vs or {}).get("sessions")
        else:
            await asyncio.to_thread(scratch.wait_member_state, "gateway", victim, "faulty", 10.0)
            await load.wait_for_acks(1000, timeout=30)

        gw = await asyncio.to_thread(scratch.status, "gateway")
        for ev in membership_events(gw):
            if ev.get("member") == victim and ev.get("t", 0) >= wall0 - 0.01:
                key = {"suspect": "gateway_suspect_s", "faulty": "gateway_faulty_s"}.get(ev.get("to"))
                if key and key not in record:
                    record[key] = round(ev["t"] - wall0, 3)

        firsts, stricts = [], []
        for p in displaced:
            first, strict = load.recovery(p, t0)
            firsts.append(first)
            stricts.append(strict)
        record["recover_max_s"] = round(max(stricts), 3) if stricts else None
        record["recover_p50_s"] = round(statistics.median(stricts), 3) if stricts else None
        record["first_ack_max_s"] = round(max(firsts), 3) if firsts else None
        record["first_ack_p50_s"] = round(statistics.median(firsts), 3) if firsts else None
        others = [p for p in players if owners[p] != victim]
        record["others_stall_max_s"] = round(load.longest_gap(t0, t_served, others), 3)

        record["unrecovered"] = sum(1 for f in stricts if math.isinf(f))
        record["stopped_cleanly"] = await load.stop_bounded()
        stopped, load = load, None
        record.update(await asyncio.to_thread(invariants, scratch, stopped))
    except Exception as exc:  # noqa: BLE001 - a failed run is a figure too
        record["error"] = f"{type(exc).__name__}: {exc}"
        scratch.keep = True
    finally:
        await close_run(record, scratch, load, keep=args.keep)
    return record


async def close_run(record: dict[str, Any], scratch: Scratch, load: TimedLoad | None, *, keep: bool) -> None:
    """End a run: stop any load still going, keep the scratch dir when something went wrong."""
    if load is not None:
        await load.stop_bounded()
    bad = record.get("error") or any(
        record.get(k) for k in ("lost", "doubled", "disconnected", "errors", "connection_errors")
    )
    scratch.keep = scratch.keep or bool(bad) or keep
    await asyncio.to_thread(scratch.close)


# -- scenario 3 -------------------------------------------------------------------------------


def burn(deadline_monotonic_s: float) -> None:
    """Spin one CPU until the deadline (a separate process; monotonic clock is system-wide)."""
    x = 0
    while time.monotonic() < deadline_monotonic_s:
        for _ in range(100_000):
            x += 1


class MembershipPoller(threading.Thread):
    """Polls every member's /status every `interval` s; records faulty/suspect states and the
    transitions the members report in `membership.recent`."""

    def __init__(self, scratch: Scratch, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.scratch = scratch
        self.interval = interval
        self.observers = ["gateway", *scratch.config.node_names]
        self.halt = threading.Event()
        self.phase = "baseline"
        self.polls = 0
        self.unanswered = 0
        self.slowest_poll = 0.0
        self.faulty_seen: Counter[tuple[str, str, str]] = Counter()  # (phase, observer, member)
        self.suspect_seen: Counter[tuple[str, str, str]] = Counter()
        self.events: dict[tuple[str, float, str, str, str], str] = {}  # event key -> phase
        self.max_local_health = 0
        self.self_faulty: dict[str, int] = {}
        self.dropped_all: dict[str, int] = {}

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            for observer in self.observers:
                started = time.monotonic()
                status = self.scratch.status(observer, timeout=2.0)
                self.slowest_poll = max(self.slowest_poll, time.monotonic() - started)
                self.polls += 1
                if status is None:
                    self.unanswered += 1
                    continue
                self.observe(observer, status)
            next_at += self.interval
            self.halt.wait(max(0.0, next_at - time.monotonic()))

    def observe(self, observer: str, status: dict[str, Any]) -> None:
        m = status.get("membership", {})
        for member, state in m.get("members", {}).items():
            if state == "faulty":
                self.faulty_seen[(self.phase, observer, member)] += 1
            elif state == "suspect":
                self.suspect_seen[(self.phase, observer, member)] += 1
        self.max_local_health = max(self.max_local_health, int(m.get("local_health", 0) or 0))
        self.self_faulty[observer] = int(m.get("self_faulty", 0) or 0)
        if "dropped_all_activations" in status:
            self.dropped_all[observer] = int(status["dropped_all_activations"] or 0)
        for ev in m.get("recent", []):
            key = (
                observer,
                float(ev.get("t", 0)),
                str(ev.get("member")),
                str(ev.get("from")),
                str(ev.get("to")),
            )
            self.events.setdefault(key, self.phase)

    def summary(self, phase: str, since_wall: float) -> dict[str, Any]:
        evs = [k for k, ph in self.events.items() if ph == phase and k[1] >= since_wall]
        return {
            "faulty_members_seen": sorted({f"{o}->{mb}" for (ph, o, mb) in self.faulty_seen if ph == phase}),
            "faulty_observations": sum(n for (ph, _, _), n in self.faulty_seen.items() if ph == phase),
            "suspect_observations": sum(n for (ph, _, _), n in self.suspect_seen.items() if ph == phase),
            "transitions_to_faulty": sum(1 for k in evs if k[4] == "faulty"),
            "suspicions": sum(1 for k in evs if k[3] == "alive" and k[4] == "suspect"),
            "refuted": sum(1 for k in evs if k[3] == "suspect" and k[4] == "alive"),
        }


async def burn_run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Scratch("burn")
    record: dict[str, Any] = {
        "scenario": "cpu_burn",
        "loadavg_1m_at_start": os.getloadavg()[0],
        "burn_seconds": args.burn_seconds,
        "burn_procs": args.burn_procs,
        "players": args.burn_players,
        "interval_ms": args.burn_interval_ms,
        "baseline_seconds": args.baseline_seconds,
    }
    load: TimedLoad | None = None
    poller: MembershipPoller | None = None
    burners: list[multiprocessing.process.BaseProcess] = []
    try:
        await asyncio.to_thread(scratch.local.up)
        players = [f"c{i}" for i in range(args.burn_players)]
        load = TimedLoad(
            scratch.url, {p: scratch.token(p) for p in players}, interval=args.burn_interval_ms / 1000
        )
        await asyncio.wait_for(load.start(), 30)
        await load.wait_for_acks(500, timeout=30)
        poller = MembershipPoller(scratch)
        poller.start()
        wall_base, t_base = time.time(), time.monotonic()
        await asyncio.sleep(args.baseline_seconds)

        poller.phase = "burn"
        wall_burn, t_burn = time.time(), time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        deadline = time.monotonic() + args.burn_seconds
        burners = [ctx.Process(target=burn, args=(deadline,), daemon=True) for _ in range(args.burn_procs)]
        for proc in burners:
            proc.start()
        say(f"  burning {args.burn_procs} CPUs for {args.burn_seconds:.0f}s beside the cluster ...")
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if time.monotonic() - last_report >= 60:
                last_report = time.monotonic()
                s = poller.summary("burn", wall_burn)
                say(
                    f"  ... {time.monotonic() - t_burn:.0f}s: faulty seen {s['faulty_observations']}, "
                    f"suspicions {s['suspicions']}, load avg {os.getloadavg()[0]:.1f}"
                )
        record["loadavg_1m_end_of_burn"] = round(os.getloadavg()[0], 2)
        t_burn_end = time.monotonic()
        for proc in burners:
            proc.join(5)
        await asyncio.sleep(1.0)  # let one more poll see the members after the burn
        poller.halt.set()
        await asyncio.to_thread(poller.join, 5)

        for phase, t0, t1, wall in (
            ("baseline", t_base, t_burn, wall_base),
            ("burn", t_burn, t_burn_end, wall_burn),
        ):
            lat = sorted(load.latencies(t0, t1))
            record[phase] = {
                **poller.summary(phase, wall),
                "acks_per_s": round(load.acks_between(t0, t1) / max(t1 - t0, 1e-9)),
                "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
                "latency_p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None,
                "latency_max_ms": round(1000 * lat[-1], 1) if lat else None,
                "longest_ack_gap_s": round(load.longest_gap(t0, t1), 3),
            }
        record.update(
            polls=poller.polls,
            unanswered_polls=poller.unanswered,
            slowest_poll_s=round(poller.slowest_poll, 3),
            max_local_health=poller.max_local_health,
            self_faulty=poller.self_faulty,
            dropped_all_activations=poller.dropped_all,
        )
        record["stopped_cleanly"] = await load.stop_bounded()
        stopped, load = load, None
        record.update(await asyncio.to_thread(invariants, scratch, stopped))
    except Exception as exc:  # noqa: BLE001
        record["error"] = f"{type(exc).__name__}: {exc}"
        scratch.keep = True
    finally:
        for proc in burners:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if poller is not None:
            poller.halt.set()
        if load is not None:
            await load.stop_bounded()
        burn_faulty = record.get("burn", {}).get("faulty_observations")
        scratch.keep = scratch.keep or bool(burn_faulty) or args.keep
        await asyncio.to_thread(scratch.close)
    return record


# -- report -----------------------------------------------------------------------------------


def fmt(x: Any, unit: str = "s") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    return f"{x:.3f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def summarize(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r and r.get("recover_max_s") is not None]

    def agg(key: str) -> dict[str, float | None]:
        vals = [r[key] for r in ok if r.get(key) is not None]
        if not vals:
            return {"p50": None, "max": None}
        return {"p50": round(statistics.median(vals), 3), "max": round(max(vals), 3)}

    out: dict[str, Any] = {
        "runs": len(runs),
        "failed_runs": len(runs) - len(ok),
        "target_s": TARGETS[kind],
        "displaced_per_run": [r.get("displaced") for r in runs],
        "per_run_max": agg("recover_max_s"),
        "per_run_p50": agg("recover_p50_s"),
        "first_ack_per_run_max": agg("first_ack_max_s"),
        "first_ack_per_run_p50": agg("first_ack_p50_s"),
        "rtt_p50_ms_before": agg("rtt_p50_ms_before"),
        "unrecovered": sum(int(r.get("unrecovered") or 0) for r in runs),
        "placement_unverified_runs": sum(1 for r in runs if r.get("placement_verified") is False),
        "gateway_faulty_s": agg("gateway_faulty_s"),
        "gateway_suspect_s": agg("gateway_suspect_s"),
        "others_stall_max_s": agg("others_stall_max_s"),
    }
    for key in (
        "lost",
        "doubled",
        "lost_updates",
        "doubled_updates",
        "disconnected",
        "errors",
        "connection_errors",
    ):
        out[key] = sum(int(r.get(key) or 0) for r in runs)
    out["acked_total"] = sum(int(r.get("acked_total") or 0) for r in runs)
    if kind == "sigstop":
        out["rejoin_s"] = agg("rejoin_s")
        out["moveback_stall_max_s"] = agg("moveback_stall_max_s")
        out["served_during_pause"] = sum(1 for r in runs if r.get("served_during_pause"))
    return out


def print_table(summary: dict[str, Any]) -> None:
    say("")
    say("Failover (per-run max = time until every displaced session is answered again)")
    head = (
        f"{'scenario':<9} {'runs':>4} {'displ.':>7} {'max p50':>9} {'max max':>9} {'p50 p50':>9} "
        f"{'gw faulty':>9} {'rtt':>7} {'target':>7} {'lost/dbl/disc/err':>18}"
    )
    say(head)
    say("-" * len(head))
    for kind in ("sigkill", "sigstop"):
        s = summary.get(kind)
        if not s:
            continue
        displaced = [d for d in s["displaced_per_run"] if d is not None]
        d = f"{min(displaced)}-{max(displaced)}" if displaced else "-"
        say(
            f"{kind:<9} {s['runs']:>4} {d:>7} {fmt(s['per_run_max']['p50']):>9} "
            f"{fmt(s['per_run_max']['max']):>9} {fmt(s['per_run_p50']['p50']):>9} "
            f"{fmt(s['gateway_faulty_s']['p50']):>9} {fmt(s['rtt_p50_ms_before']['p50'], 'ms'):>7} "
            f"{'<' + str(s['target_s']) + 's':>7} "
            f"{'/'.join(str(s[k]) for k in ('lost', 'doubled', 'disconnected', 'errors')):>18}"
        )
        if s["failed_runs"]:
            say(f"          {s['failed_runs']} run(s) failed; see the JSON")
        if s["placement_unverified_runs"]:
            say(
                f"          {s['placement_unverified_runs']} run(s): displaced set not verified (see warning)"
            )
        if s["unrecovered"]:
            say(f"          {s['unrecovered']} displaced session(s) never answered again within the window")
    say(
        "max p50 / max max: p50 and max over runs of the per-run max; p50 p50: p50 over runs of the "
        "per-run p50;\ngw faulty: p50 time until the gateway declared the victim faulty; rtt: p50 "
        "request round trip before the fault (the measurement's resolution)"
    )
    if "sigstop" in summary:
        s = summary["sigstop"]
        say(
            f"sigstop: node rejoined {fmt(s['rejoin_s']['p50'])} (p50) after SIGCONT; longest stall while "
            f"sessions moved back {fmt(s['moveback_stall_max_s']['max'])} (max)"
        )
    b = summary.get("cpu_burn")
    if b:
        say("")
        say(
            f"False positives under CPU saturation "
            f"({b['burn_procs']} spinning processes, {b['players']} players)"
        )
        if "error" in b:
            say(f"  failed: {b['error']}")
        for phase in ("baseline", "burn"):
            p = b.get(phase)
            if not p:
                continue
            secs = b["baseline_seconds"] if phase == "baseline" else b["burn_seconds"]
            say(
                f"  {phase:<8} {secs:>5.0f}s: faulty seen {p['faulty_observations']} "
                f"{p['faulty_members_seen'] or ''} transitions->faulty {p['transitions_to_faulty']}, "
                f"suspicions {p['suspicions']} (refuted {p['refuted']}), "
                f"{p['acks_per_s']} acks/s, latency p50/p99/max {p['latency_p50_ms']}/"
                f"{p['latency_p99_ms']}/{p['latency_max_ms']} ms"
            )
        if "polls" in b:
            say(
                f"  polls {b['polls']} (unanswered {b['unanswered_polls']}, slowest {b['slowest_poll_s']}s), "
                f"load avg {b.get('loadavg_1m_end_of_burn')}, "
                f"max Lifeguard local health {b['max_local_health']}, lost/dbl/disc/err "
                f"{'/'.join(str(b.get(k)) for k in ('lost', 'doubled', 'disconnected', 'errors'))}"
            )
    say("")
    say("Anchors (time to drop a dead node, default settings):")
    for name, figure in ANCHORS:
        say(f"  {name:<36} {figure}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([".venv/bin/python -m loadtest.failover_bench", *sys.argv[1:]]),
        "players": args.players,
    }
    all_runs: list[dict[str, Any]] = []
    for kind in ("sigkill", "sigstop"):
        if kind in args.skip:
            continue
        runs = []
        for i in range(1, args.runs + 1):
            r = await failover_run(kind, i, args)
            runs.append(r)
            if "error" in r:
                say(f"{kind} run {i}/{args.runs}: FAILED {r['error']}")
            else:
                say(
                    f"{kind} run {i}/{args.runs}: victim {r['victim']} ({r['displaced']} displaced), "
                    f"all answered again after {fmt(r['recover_max_s'])} (p50 {fmt(r['recover_p50_s'])}, "
                    f"first ack after the kill: max {fmt(r['first_ack_max_s'])}), "
                    f"gateway faulty at {fmt(r.get('gateway_faulty_s'))}; "
                    f"lost {r.get('lost')} doubled {r.get('doubled')} disconnected {r.get('disconnected')} "
                    f"errors {r.get('errors')}, load avg {r['loadavg_1m_at_start']:.1f} at start"
                    + (f", rejoined {fmt(r.get('rejoin_s'))} after SIGCONT" if kind == "sigstop" else "")
                )
        summary[kind] = summarize(kind, runs)
        all_runs += runs
    if "burn" not in args.skip:
        b = await burn_run(args)
        summary["cpu_burn"] = b
        burn = b.get("burn", {})
        say(
            f"cpu_burn: {args.burn_seconds:.0f}s, faulty seen {burn.get('faulty_observations')}, "
            f"suspicions {burn.get('suspicions')}" + (f", FAILED {b['error']}" if "error" in b else "")
        )
    summary["runs"] = all_runs
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.failover_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per failover scenario (default 5)")
    ap.add_argument("--players", type=int, default=200, help="closed-loop players (default 200)")
    ap.add_argument("--pause-seconds", type=float, default=6.0, help="SIGSTOP length (default 6)")
    ap.add_argument("--burn-seconds", type=float, default=300.0, help="CPU burner duration (default 300)")
    ap.add_argument("--burn-procs", type=int, default=2, help="spinning processes (default 2)")
    ap.add_argument("--burn-players", type=int, default=50, help="players during the burn (default 50)")
    ap.add_argument("--burn-interval-ms", type=float, default=20.0, help="pause between a player's requests")
    ap.add_argument("--baseline-seconds", type=float, default=10.0, help="load without burner first")
    ap.add_argument("--skip", action="append", default=[], choices=["sigkill", "sigstop", "burn"])
    ap.add_argument("--keep", action="store_true", help="keep every scratch directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    say(
        f"failover bench: {args.runs} runs x SIGKILL/SIGSTOP with {args.players} players; "
        f"burn {args.burn_seconds:.0f}s x {args.burn_procs} procs; nproc {os.cpu_count()}"
    )
    summary = asyncio.run(main_async(args))
    print_table(summary)
    print(orjson.dumps(summary, default=str).decode(), flush=True)


if __name__ == "__main__":
    main()
