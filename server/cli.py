"""`ringside`: the console script behind the Makefile targets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

import orjson

from server.cluster import ClusterError, LocalCluster
from server.config import DEV_SECRET, ClusterConfig, ConfigError, load_config
from server.tokens import TokenError, mint

DEFAULT_CONFIG = "configs/local.toml"


def _run_async(main: object) -> None:
    import uvloop

    uvloop.run(main)  # type: ignore[arg-type]


def _warn_development_credentials(config: ClusterConfig) -> None:
    found = config.development_credentials()
    if found:
        logging.getLogger("ringside").warning(
            "using the public development credentials: anyone can mint tokens or run admin actions; "
            "set %s in any real deployment",
            " and ".join(found),
        )


def cmd_node(args: argparse.Namespace) -> int:
    from server.logs import setup_logging
    from server.node import Node

    config = load_config(args.config)
    setup_logging(args.name, config.log_level)
    _warn_development_credentials(config)
    _run_async(Node(config, args.name).run())
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from server.logs import setup_logging

    config = load_config(args.config)
    if args.replace is not None:
        _check_is_a_gateway(args.replace)
    setup_logging("gateway", config.log_level)
    _warn_development_credentials(config)
    _run_async(Gateway(config, replace=args.replace).run())
    return 0


def _check_is_a_gateway(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except FileNotFoundError:
        return  # gone already: nothing to replace, the ports are free
    if b"gateway" not in argv:
        shown = b" ".join(argv).decode(errors="replace")[:200]
        raise ClusterError(f"--replace {pid}: that process is not a ringside gateway ({shown})")


def cmd_token(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.secret == DEV_SECRET:
        print("note: using the development secret from the config", file=sys.stderr)
    ttl = args.ttl if args.ttl is not None else config.gateway.token_ttl_s
    expires_at = int(time.time()) + ttl
    try:
        for player in args.players:
            print(mint(config.secret_bytes, player, expires_at=expires_at))
    except TokenError as exc:
        print(f"ringside token: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Print a new gossip key and how to rotate keys without downtime."""
    import base64
    import secrets

    key = base64.b64encode(secrets.token_bytes(32)).decode()
    print(key)
    print(
        "\nGossip keyring rotation, with no downtime (cluster.gossip_keys or RINGSIDE_GOSSIP_KEYS,\n"
        "comma-separated; the first key seals, every key opens):\n"
        "  1. append the new key on every member (the nodes and the gateway) and restart them all,\n"
        "     one at a time: `make deploy GATEWAY=1` (the gateway last; its clients reconnect);\n"
        "  2. move it first on every member, deploy again the same way: members now seal with it;\n"
        "  3. remove the old key, deploy again.\n"
        "Finish each step on every member, the gateway too, before the next: a member that still\n"
        "lacks the key others seal with cannot read them.",
        file=sys.stderr,
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke tokens until they expire: the gateway refuses them at hello (4001)."""
    from server.store import Store
    from server.tokens import verify

    config = load_config(args.config)

    async def revoke() -> None:
        store = Store(config.redis.effective_url)
        try:
            for token in args.tokens:
                claims = verify(config.secret_bytes, token, now=time.time())
                if not claims.token_id:
                    raise TokenError("token has no id (minted by an old version); rotate the secret")
                await store.revoke(claims.token_id, claims.expires_at - int(time.time()))
                print(f"revoked token {claims.token_id} of {claims.player}")
        finally:
            await store.close()

    try:
        asyncio.run(revoke())
    except TokenError as exc:
        print(f"ringside revoke: {exc.reason}", file=sys.stderr)
        return 2
    return 0


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster(load_config(args.config), args.config)


def cmd_up(args: argparse.Namespace) -> int:
    try:
        _cluster(args).up()  # stops what it started if it fails
    except ClusterError as exc:
        print(f"ringside up: {exc}", file=sys.stderr)
        return 1
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    """Foreground: up, print how to connect, and on Ctrl-C bring it all down."""
    cluster = _cluster(args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.up()  # stops what it started if it fails, and touches nothing already running
    except ClusterError as exc:
        print(f"ringside run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    try:
        g = cluster.config.gateway
        print(f"\nGateway: ws://{g.host}:{g.port}/ws   (admin: http://{g.host}:{g.port}/status)")
        print("Get a token:  .venv/bin/ringside token alice")
        print('Then send:    {"op": "hello", "token": "<token>"}')
        print("Dashboard:    make dashboard   (prints its URL, with the admin token)")
        print("Ctrl-C stops the cluster (each node flushes its state first).\n")
        reported: set[str] = set()
        while True:
            time.sleep(1)
            stopped = {n for n in cluster.process_names() if cluster.pid(n) is None}
            for name in sorted(stopped - reported):
                if cluster.drained_file(name).exists():
                    print(f"{name} drained and exited (`make restart NODE={name}` starts it again)")
                else:
                    print(
                        f"{name} exited or was killed (see {cluster.log_file(name)}; "
                        f"`make restart NODE={name}` starts it again)"
                    )
            reported = stopped
    except ClusterError as exc:
        print(f"ringside run: {exc}", file=sys.stderr)
        return_code = 1
    except KeyboardInterrupt:
        return_code = 0
    print("\nstopping...")
    cluster.down()
    print("stopped")
    return return_code


def cmd_down(args: argparse.Namespace) -> int:
    _cluster(args).down()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = _cluster(args).status()
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0 if all(r["healthy"] or r.get("drained") for r in rows) else 1
    print(
        f"{'NAME':<9} {'PID':>7}  {'HEALTH':<9} {'MEMBER':<8} {'INC':>3} {'CHECKSUM':<10} "
        f"{'ACTORS':>7} {'SESSIONS':>8} {'DIRTY':>6}  DETAIL"
    )
    for r in rows:
        s = r.get("status", {})
        m = s.get("membership", {})
        if r["healthy"]:
            health = "healthy"
        elif r["running"]:
            health = "unhealthy"
        else:
            health = "drained" if r.get("drained") else "down"
        state = m.get("members", {}).get(r["name"], "-")
        print(
            f"{r['name']:<9} {r['pid'] or '-':>7}  {health:<9} {state:<8} {m.get('incarnation', '-'):>3} "
            f"{m.get('checksum', '-')[:10]:<10} {s.get('actors', '-'):>7} {s.get('sessions', '-'):>8} "
            f"{s.get('dirty', '-'):>6}  {r.get('detail', '')}"
        )
    views = {r["status"]["membership"]["checksum"] for r in rows if r.get("status", {}).get("membership")}
    if len(views) > 1:
        print(f"membership views differ ({len(views)} checksums): gossip is still converging")
    # A node drained on purpose is not a failure; one that died (or was killed) is.
    return 0 if all(r["healthy"] or r.get("drained") for r in rows) else 1


def cmd_kill(args: argparse.Namespace) -> int:
    pid = _cluster(args).kill(args.name)
    print(f"sent SIGKILL to {args.name} (pid {pid})")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    print(f"SIGSTOP {args.name} for {args.seconds}s")
    _cluster(args).pause(args.name, args.seconds)
    print(f"SIGCONT {args.name}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    _cluster(args).drain(args.name, force=args.force)
    return 0


def cmd_add_node(args: argparse.Namespace) -> int:
    _cluster(args).add_node(args.name)
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    _cluster(args).restart(args.name)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    _cluster(args).deploy(gateway=args.gateway)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringside", description=__doc__)
    parser.add_argument(
        "--config",
        default=os.environ.get("RINGSIDE_CONFIG", DEFAULT_CONFIG),
        help="cluster config (TOML); default %(default)s",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("node", help="run one node in the foreground")
    p.add_argument("name")
    p.set_defaults(func=cmd_node)
    p = sub.add_parser("gateway", help="run the gateway in the foreground")
    p.add_argument(
        "--replace",
        type=int,
        metavar="PID",
        help="take over from the gateway running as PID: once this one is ready it stops that one "
        "and takes the client port at once, the gossip port as it is freed (a restart without a "
        "refused window)",
    )
    p.set_defaults(func=cmd_gateway)
    p = sub.add_parser("token", help="mint one signed token per player, one per line")
    p.add_argument("players", nargs="+")
    p.add_argument("--ttl", type=int, default=None, help="seconds until expiry")
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("revoke", help="revoke tokens (stored in Redis until they expire)")
    p.add_argument("tokens", nargs="+")
    p.set_defaults(func=cmd_revoke)
    sub.add_parser("keys", help="print a new gossip key and the rotation steps").set_defaults(func=cmd_keys)
    sub.add_parser("up", help="start the local cluster in the background").set_defaults(func=cmd_up)
    sub.add_parser("run", help="start the local cluster in the foreground").set_defaults(func=cmd_run)
    sub.add_parser("down", help="stop the local cluster").set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="every process and whether it is healthy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    for command, func, text in (
        ("drain", cmd_drain, "hand a node's actors and sessions to others, then stop it"),
        ("add-node", cmd_add_node, "start a node (e.g. a standby from the config) and join it"),
        ("restart", cmd_restart, "drain a node (or `gateway`), start it again, wait until it serves"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("name")
        if command == "drain":
            p.add_argument("--force", action="store_true", help="drain even the last running node")
        p.set_defaults(func=func)
    p = sub.add_parser("deploy", help="rolling restart of every node (and with --gateway, the gateway)")
    p.add_argument(
        "--gateway", action="store_true", help="restart the gateway too, last (its clients reconnect)"
    )
    p.set_defaults(func=cmd_deploy)
    p = sub.add_parser("kill", help="SIGKILL one process (failure drill)")
    p.add_argument("name")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("pause", help="SIGSTOP one process, then SIGCONT (failure drill)")
    p.add_argument("name")
    p.add_argument("seconds", type=float)
    p.set_defaults(func=cmd_pause)
    for subparser in sub.choices.values():  # `ringside token alice --config c.toml` works too
        subparser.add_argument("--config", default=argparse.SUPPRESS, help="as before the command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("node", "gateway") and not os.path.exists(args.config):
        if args.config != DEFAULT_CONFIG:
            print(f"ringside: config file not found: {args.config}", file=sys.stderr)
            return 2
        args.config = None
    try:
        return int(args.func(args))
    except (ConfigError, ClusterError) as exc:
        print(f"ringside {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
