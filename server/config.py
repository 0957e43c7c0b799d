"""Cluster configuration: frozen dataclasses loaded once from a TOML file.

Every value has a default here; `configs/local.toml` overrides some, and the
environment overrides both: `RINGSIDE_<SECTION>_<KEY>` (for example
`RINGSIDE_NODE_FLUSH_INTERVAL_MS=50`), plus `REDIS_URL` and `RINGSIDE_SECRET`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.swim import SwimConfig
from server.swim_codec import GossipKey, Keyring

DEV_SECRET = "ringside-development-secret-do-not-use-in-production"
DEV_ADMIN_TOKEN = "ringside-development-admin-token"


class ConfigError(ValueError):
    """The configuration file or environment holds a value we cannot use."""


@dataclass(frozen=True, slots=True)
class NodeAddress:
    name: str
    host: str = "127.0.0.1"
    link_port: int = 7101  # gateway and peer links (TCP)
    admin_port: int = 7201  # /healthz /metrics /status (HTTP)
    gossip_port: int = 7301  # SWIM (UDP) and push-pull (TCP)
    standby: bool = False  # not started by `up`; `make add-node NODE=...` starts it


@dataclass(frozen=True, slots=True)
class NodeSettings:
    flush_interval_ms: int = 100  # write-behind period; also the replay window on a crash
    # Actor states per Redis round trip. Small batches keep each flush's burst of work
    # (encoding the states, then reporting them durable) short, so requests that arrive
    # meanwhile are not held behind it; larger ones drain a backlog faster (decision 36).
    flush_batch_max: int = 32
    redis_max_connections: int = 64  # per node; more concurrent commands wait for one
    max_dirty: int = 50_000  # dirty actors held while Redis is away; past it writes get `unavailable`
    max_activations: int = 100_000  # per node; least recently used clean actors passivate first
    idle_timeout_s: float = 300.0  # an actor unused this long passivates
    activation_timeout_s: float = 5.0  # taking the epoch and loading state
    retry_base_ms: int = 50  # Redis retry backoff: full jitter, base * 2**n capped
    retry_cap_ms: int = 2_000
    max_pending_per_actor: int = 256  # messages held while an actor activates
    max_inventory: int = 64  # items in a player's inventory
    max_stats: int = 64  # keys in a player's stats
    max_name_len: int = 64
    max_games_per_player: int = 8
    call_timeout_s: float = 5.0  # actor-to-actor call, retries across owner changes included
    max_hops: int = 3  # forwards of a message for an actor the receiver does not own
    game_max_players: int = 64
    game_log_size: int = 256  # recent events a game keeps for players catching up
    game_max_action_bytes: int = 512
    game_empty_close_s: float = 60.0
    game_max_duration_s: float = 3600.0
    # A game gone quiet sends its last event to its players again this long after it, then
    # twice and four times as long after that (game_announces in all): a push that a copy of
    # a player's actor on a node whose ring lagged took in its place shows as a gap the
    # player fills, even when it was the game's last. 0 turns it off.
    game_announce_s: float = 1.0
    game_announces: int = 3
    max_link_frame_bytes: int = 1 << 20  # node-link frame bound
    link_write_buffer_bytes: int = 4 << 20  # pause reading a link while its peer is this far behind
    # Links between processes on one host (gateway to node, node to node) go over a Unix
    # socket (Linux abstract namespace) instead of TCP loopback; false: TCP everywhere.
    unix_links: bool = True
    leave_timeout_s: float = 0.8  # on stop: gossip `leaving`, then `left` (swim.leave_linger 0.3 s)
    # A process stalled (SIGSTOP, VM pause) longer than this may have been declared faulty
    # and had its actors reassigned: it drops them unwritten. Keep it below the fastest
    # failure detection (ack_timeout + protocol_period + suspicion_min = 0.78 s by default).
    stall_drop_s: float = 0.7
    drain_timeout_s: float = 30.0  # past it, a draining node flushes what is left and exits
    # On stop (SIGTERM), how long a node keeps retrying Redis for what is dirty before it
    # exits anyway, logging (and marking in its run dir) what was not written.
    stop_flush_timeout_s: float = 20.0
    # Drain and scale-up hand actors over node to node (state and a fresh epoch travel
    # together, decision 11); "redis": new owners load from Redis after a final flush.
    handoff: str = "live"
    migration_timeout_s: float = 3.0  # past it, actors still busy take the Redis way
    migration_batch_bytes: int = 256 << 10  # state bytes per hand-over message (< max_link_frame)
    migration_redirect_s: float = 30.0  # how long a node sends messages for moved actors on
    migration_recent_epochs: int = 4096  # deactivations remembered to refuse stale hand-overs
    # For this long after a ring change gives a node actors (it joined, or their owner is
    # leaving), it asks an actor's previous owner to hand it over before loading it from
    # Redis: the gateway may re-pin a session before that owner has pushed the actor
    # (decision 11). Never from a member declared faulty. 0 turns pulls off.
    migration_pull_s: float = 10.0
    migration_pull_timeout_s: float = 0.5  # then the actor loads from Redis
    # For this long after its ring changes, a node asks Redis for a game's epoch before a
    # read (`game.get`, `game.events`): while the change spreads, another node may have
    # taken the game over and written events this copy lacks (decision 34). 0: never.
    ring_settle_s: float = 10.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8765  # client WebSockets on /ws, admin on /healthz /metrics /status
    gossip_port: int = 7300
    max_frame_bytes: int = 4096  # larger client frames are closed with 1009
    handshake_timeout_s: float = 5.0  # time allowed for the hello frame
    attach_timeout_s: float = 5.0  # node activation of the player during hello
    max_sessions: int = 20_000
    max_sessions_per_address: int = 1_000  # from one source IP; more get 1013
    rate_limit_per_s: float = 100.0  # client frames a second per session, sustained
    rate_limit_burst: float = 200.0  # frames a session may send at once; past the limit: close 4006
    allowed_origins: str = ""  # comma-separated Origin allow-list for browsers; empty: any
    # Where the client port listens: empty, `host`; "0.0.0.0", every IPv4 interface ("::" is
    # IPv6 only: asyncio sets IPV6_V6ONLY).
    # `host` itself is the address the nodes dial (gossip), so it must be a routable one.
    listen_host: str = ""
    # The dashboard, /status, /metrics and /admin share the client port: they answer peers on
    # loopback and in `admin_networks` (comma-separated CIDRs, e.g. your monitoring subnet);
    # /healthz anyone. admin_from_anywhere: every peer (behind a proxy that filters).
    admin_networks: str = ""
    admin_from_anywhere: bool = False
    max_replay: int = 1024  # requests kept per session until the node reports them durable
    max_outbound: int = 256  # frames queued per client before it is closed as too slow (4004)
    move_timeout_s: float = 10.0  # how long a session's requests wait for its node to come back
    # Kernel send buffer per client socket. Bounds memory per slow client and how much it
    # can fall behind before its outbound queue fills and it is closed with 4004.
    socket_send_buffer: int = 64 * 1024
    close_timeout_s: float = 5.0  # a closing client has this long to read its backlog and close frame
    link_retry_base_ms: int = 50
    link_retry_cap_ms: int = 1_000
    token_ttl_s: int = 86_400  # default lifetime of tokens minted by `ringside token`
    leave_timeout_s: float = 0.8  # on stop: gossip `leaving`, then `left`
    # How long a stopping gateway gossips `leaving` before `left`. A node lingers
    # (`[swim] leave_linger`) so that peers take it out of the ring before it goes; a gateway
    # owns no ring slot, and a restart's new gateway waits for its gossip port.
    leave_linger_s: float = 0.0
    # On stop, how long clients have to finish their close handshake (1001) before they are
    # cut: the process (and a restart's gossip port) is held until then.
    stop_close_timeout_s: float = 1.0
    # On stop, how long a session waits for the replies to the requests it already forwarded
    # before it is closed (1001): a request a client got no reply to was not applied
    # (decision 30) unless a node took longer than this to answer.
    stop_reply_timeout_s: float = 1.0
    # A restart's new gateway (`ringside gateway --replace PID`) waits this long for the one
    # it replaces to free its ports: more than that one's stop takes (the timeouts above).
    replace_wait_s: float = 30.0

    @property
    def listen_address(self) -> str:
        return self.listen_host or self.host

    def admin_network_list(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        try:
            return [ipaddress.ip_network(n.strip()) for n in self.admin_networks.split(",") if n.strip()]
        except ValueError as exc:
            raise ConfigError(f"[gateway] admin_networks: {exc}") from exc


@dataclass(frozen=True, slots=True)
class GcSettings:
    """The garbage collector's policy in the gateway and the nodes (server/gcpolicy.py)."""

    # Freeze what is live after startup and after every full collection, so that a full
    # collection walks only what is new, not every session the process holds (the gateway's
    # longest pause 120 ms against 482 ms, ramping to 6,000 sessions). False: CPython's own.
    freeze: bool = True
    # Unfreeze and collect everything this often, freeing reference cycles among frozen
    # objects (none are known; each reclaim logs what it freed). One full pause each. 0: never.
    reclaim_interval_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = ""  # empty: start the embedded redis-server on `port`
    host: str = "127.0.0.1"
    port: int = 6390
    appendonly: bool = True

    @property
    def effective_url(self) -> str:
        return self.url or f"redis://{self.host}:{self.port}/0"

    @property
    def embedded(self) -> bool:
        return not self.url


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    secret: str = DEV_SECRET
    admin_token: str = DEV_ADMIN_TOKEN  # required by /admin/* actions (drain)
    # Comma-separated base64 AES keys (16/24/32 bytes): gossip is sealed with AES-GCM, the
    # first key seals, all open (see `ringside keys`). Empty: HMAC-only (development).
    gossip_keys: str = ""
    log_level: str = "info"  # debug, info, warning, error; LOG_LEVEL overrides
    run_dir: str = ".run"
    redis: RedisSettings = field(default_factory=RedisSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    swim: SwimConfig = field(default_factory=SwimConfig)
    gc: GcSettings = field(default_factory=GcSettings)
    nodes: tuple[NodeAddress, ...] = (
        NodeAddress("n1", link_port=7101, admin_port=7201, gossip_port=7301),
        NodeAddress("n2", link_port=7102, admin_port=7202, gossip_port=7302),
        NodeAddress("n3", link_port=7103, admin_port=7203, gossip_port=7303),
    )

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.encode()

    def development_credentials(self) -> list[str]:
        """The well-known development values still in use, as the settings that replace them."""
        found = []
        if self.secret == DEV_SECRET:
            found.append("RINGSIDE_SECRET (cluster.secret)")
        if self.admin_token == DEV_ADMIN_TOKEN:
            found.append("RINGSIDE_ADMIN_TOKEN (cluster.admin_token)")
        return found

    @property
    def gossip_key(self) -> GossipKey:
        if self.gossip_keys:
            try:
                keys = [base64.b64decode(k.strip(), validate=True) for k in self.gossip_keys.split(",")]
                return Keyring(keys)
            except ValueError as exc:
                raise ConfigError(f"gossip_keys: {exc}") from exc
        return hashlib.sha256(b"ringside-gossip\0" + self.secret_bytes).digest()

    @property
    def link_key(self) -> bytes:
        return hashlib.sha256(b"ringside-link\0" + self.secret_bytes).digest()

    @property
    def game_id_key(self) -> bytes:
        """Game ids are an HMAC of (creator, request seq) under this key: the same on a
        replayed create, and not guessable from a player's name (its chat log is behind it)."""
        return hashlib.sha256(b"ringside-game-id\0" + self.secret_bytes).digest()

    @property
    def link_keyring(self) -> Keyring | None:
        """Node links are sealed with the gossip keyring when one is configured."""
        key = self.gossip_key
        return key if isinstance(key, Keyring) else None

    def gossip_seeds(self) -> list[tuple[str, int]]:
        seeds = [(n.host, n.gossip_port) for n in self.nodes]
        return seeds + [(self.gateway.host, self.gateway.gossip_port)]

    def node_address(self, name: str) -> NodeAddress:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"no node named {name!r} in the config (have {', '.join(self.all_node_names)})")

    @property
    def node_names(self) -> list[str]:
        """The nodes `up` starts (standbys excluded)."""
        return [n.name for n in self.nodes if not n.standby]

    @property
    def all_node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _coerce(value: str, like: Any, name: str) -> Any:
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r}: expected {type(like).__name__}") from exc
    return value


def _check_dialable(what: str, host: str) -> None:
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = not host  # a host name: fine
    if unspecified:
        raise ConfigError(
            f"{what} {host!r}: other members dial this address (gossip, node links), so it must be "
            "this host's routable address; to take clients on every interface, set "
            '[gateway] listen_host = "0.0.0.0" beside it'
        )


def _section(cls: type, table: Mapping[str, Any], env: Mapping[str, str], prefix: str) -> Any:
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown keys in [{prefix.lower()}]: {sorted(unknown)}")
    env_prefix = f"RINGSIDE_{prefix}_"
    env_known = {f"{env_prefix}{name.upper()}" for name in known}
    mistyped = sorted(k for k in env if k.startswith(env_prefix) and k not in env_known)
    if mistyped:
        raise ConfigError(
            f"unknown settings in the environment: {mistyped} ([{prefix.lower()}] has {sorted(known)})"
        )
    values: dict[str, Any] = {}
    for name in known:
        default = getattr(defaults, name)
        value = table.get(name, default)
        if not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise ConfigError(f"[{prefix.lower()}] {name}: expected {type(default).__name__}")
        env_name = f"{env_prefix}{name.upper()}"
        if env_name in env:
            value = _coerce(env[env_name], default, env_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"[{prefix.lower()}] {name} = {value}: must be 0 or more")
        values[name] = value
    return cls(**values)


def run_marker(run_dir: str | Path, name: str, kind: str) -> Path:
    """`<run_dir>/<name>.<kind>`: how a node tells `ringside` (server/cluster.py) how it
    ended: `drained` on purpose, or `unflushed` (stopped with states Redis never got)."""
    return Path(run_dir) / f"{name}.{kind}"


_SECTIONS = ("cluster", "redis", "node", "gateway", "swim", "gc", "nodes")
_CLUSTER_KEYS = ("secret", "admin_token", "gossip_keys", "log_level", "run_dir")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read `path` (TOML) and the environment into a ClusterConfig. No file: all defaults."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    if unknown_sections := sorted(set(data) - set(_SECTIONS)):
        raise ConfigError(f"unknown sections {unknown_sections}; known: {list(_SECTIONS)}")
    cluster = data.get("cluster", {})
    if unknown_keys := sorted(set(cluster) - set(_CLUSTER_KEYS)):
        raise ConfigError(f"unknown keys in [cluster]: {unknown_keys}")
    redis = _section(RedisSettings, data.get("redis", {}), env, "REDIS")
    if env.get("REDIS_URL"):
        redis = dataclasses.replace(redis, url=env["REDIS_URL"])
    nodes_table = data.get("nodes")
    nodes = ClusterConfig().nodes
    if nodes_table is not None:
        nodes = tuple(NodeAddress(**entry) for entry in nodes_table)
    if len({n.name for n in nodes}) != len(nodes):
        raise ConfigError("node names must be unique")
    secret = env.get("RINGSIDE_SECRET") or cluster.get("secret", DEV_SECRET)
    admin_token = env.get("RINGSIDE_ADMIN_TOKEN") or cluster.get("admin_token", DEV_ADMIN_TOKEN)
    gossip_keys = env.get("RINGSIDE_GOSSIP_KEYS") or cluster.get("gossip_keys", "")
    log_level = env.get("LOG_LEVEL") or cluster.get("log_level", "info")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level {log_level!r}: use debug, info, warning or error")
    node = _section(NodeSettings, data.get("node", {}), env, "NODE")
    if node.handoff not in ("live", "redis"):
        raise ConfigError(f"[node] handoff {node.handoff!r}: use live or redis")
    if node.migration_batch_bytes >= node.max_link_frame_bytes:
        raise ConfigError("[node] migration_batch_bytes must be below max_link_frame_bytes")
    config = ClusterConfig(
        secret=secret,
        admin_token=admin_token,
        gossip_keys=gossip_keys,
        log_level=log_level,
        run_dir=env.get("RINGSIDE_RUN_DIR") or cluster.get("run_dir", ".run"),
        redis=redis,
        node=node,
        gateway=_section(GatewaySettings, data.get("gateway", {}), env, "GATEWAY"),
        swim=_section(SwimConfig, data.get("swim", {}), env, "SWIM"),
        gc=_section(GcSettings, data.get("gc", {}), env, "GC"),
        nodes=nodes,
    )
    for what, host in [(f"[[nodes]] {n.name} host", n.host) for n in nodes] + [
        ("[gateway] host", config.gateway.host)
    ]:
        _check_dialable(what, host)
    config.gateway.admin_network_list()  # fail at load time on a bad network
    if config.gc.reclaim_interval_s < 0:
        raise ConfigError("[gc] reclaim_interval_s must be 0 (never) or more")
    config.gossip_key  # noqa: B018 - fail at load time on bad keys, not in a gossip thread
    return config
