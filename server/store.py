"""The only module that talks to Redis: fencing epochs, state loads, fenced writes.

Keys carry a hash tag so a Redis Cluster keeps an actor's keys on one shard:
``rs:{player:alice}:state`` and ``rs:{player:alice}:epoch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from server.tokens import revoked_key

# Write each state only if the caller's epoch is still the current one (invariant 1).
# KEYS: epoch key, state key, per actor; ARGV: epoch, state blob, per actor. One call
# fences a whole chunk of actors: one command for redis-py to pack instead of hundreds.
CAS_SCRIPT = """
local written = {}
for i = 1, #KEYS, 2 do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('SET', KEYS[i + 1], ARGV[i + 1])
    written[#written + 1] = 1
  else
    written[#written + 1] = 0
  end
end
return written
"""
# Live migration (a drain, a scale-up): the same fenced write, then take the next epoch for
# the new owner, who adopts the state under it without a round trip of its own. The old
# owner's epoch is dead from here on. An empty blob: the state in Redis is current already.
# Returns the new epoch per actor, 0 where the caller's epoch was no longer current.
HANDOVER_SCRIPT = """
local epochs = {}
for i = 1, #KEYS, 2 do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    if ARGV[i + 1] ~= '' then
      redis.call('SET', KEYS[i + 1], ARGV[i + 1])
    end
    epochs[#epochs + 1] = redis.call('INCR', KEYS[i])
  else
    epochs[#epochs + 1] = 0
  end
end
return epochs
"""
# A drain's claim (decision 33): of the nodes the drainer's gossip view calls serving, those
# with no unexpired claim of their own still serve; with none left (and no force) refuse,
# else claim. One script, so of two drains at once on the last two nodes one is refused,
# whatever gossip has spread. KEYS: the claims hash (node -> until, ms on Redis's clock);
# ARGV: node, claim ttl ms, force (0/1), the other serving nodes. Returns {claimed, serving...}.
DRAIN_CLAIM_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result = {0}
for i = 4, #ARGV do
  if tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') <= now then
    result[#result + 1] = ARGV[i]
  end
end
if #result == 1 and ARGV[3] ~= '1' then
  return result
end
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
result[1] = 1
return result
"""
DRAIN_CLAIMS_KEY = "rs:draining"
CAS_CHUNK = 128  # actors per script call; bounds how long one call holds Redis
ACTIVATION_CHUNK = 512  # activations per pipeline


class StoreUnavailable(Exception):
    """Redis did not answer or failed; the caller keeps its state and retries."""


@contextlib.contextmanager
def _redis_errors_as_unavailable() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(str(exc)) from exc


class Write(NamedTuple):  # one per actor per flush: a tuple is cheaper than a dataclass
    key: str  # actor key, e.g. "player:alice"
    epoch: int
    blob: bytes


def state_key(actor: str) -> str:
    return f"rs:{{{actor}}}:state"


def epoch_key(actor: str) -> str:
    return f"rs:{{{actor}}}:epoch"


class _CPackedConnection(aioredis.Connection):
    """redis-py's asyncio client packs commands in Python, re-joining its buffer for every
    argument: ~4 us per actor state in a flush. hiredis (its parser here already) packs
    the same bytes in C, ~0.7 us."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD" and the like: split as redis-py does
            args = (*args[0].encode().split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis does not take: redis-py's way, with its errors
            return super().pack_command(*args)


class Store:
    def __init__(self, url: str, *, timeout: float = 2.0, max_connections: int = 64) -> None:
        # A blocking pool: a burst of activations waits for a connection instead of
        # failing with "Too many connections" (redis-py's default pool stops at 100).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One retry on a fresh connection when a pooled one turns out dead (Redis restarted
            # or closed it idle); not on a timeout. redis-py's default here is no retry.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            # A new connection sends only what it needs. By default redis-py 8 also names
            # itself (CLIENT SETINFO, Redis 7.2+) and asks for Redis Enterprise's maintenance
            # notices; the embedded Redis (6.2) refuses both: extra commands, and each refusal
            # left in a reference cycle with its traceback and frames until the collector ran.
            driver_info=None,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        if pool.connection_class is aioredis.Connection:  # not TLS or a Unix socket
            pool.connection_class = _CPackedConnection
        self._redis = aioredis.Redis(connection_pool=pool)
        # The flush loop's writes go on a connection of their own: redis-py's pipeline
        # (pool checkout, retry wrapper, command stack) cost more than the write itself for a
        # flush of a few dozen actors, ten times a second per node.
        self._writer: aioredis.Connection | None = None
        self._writer_lock = asyncio.Lock()
        self._closed = False
        self._activations: list[tuple[str, asyncio.Future[tuple[int, bytes | None]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        self._closed = True  # a write under way does not open a new connection now
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.disconnect(nowait=True)
        await self._redis.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def activate(self, actor: str) -> tuple[int, bytes | None]:
        """Take a new fencing epoch and load the state. Activations asked for in the same
        loop iteration (a burst of sessions moving after a ring change) share one pipeline."""
        future: asyncio.Future[tuple[int, bytes | None]] = asyncio.get_running_loop().create_future()
        self._activations.append((actor, future))
        if len(self._activations) == 1:
            asyncio.get_running_loop().call_soon(self._send_activations)
        return await future

    def _send_activations(self) -> None:
        pending, self._activations = self._activations, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(pending), ACTIVATION_CHUNK):
            task = loop.create_task(self._run_activations(pending[start : start + ACTIVATION_CHUNK]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_activations(
        self, batch: list[tuple[str, asyncio.Future[tuple[int, bytes | None]]]]
    ) -> None:
        # A caller that gave up (timed out) must not take an epoch: it would fence a
        # hand-over that its key's next activation may take meanwhile.
        batch = [(actor, future) for actor, future in batch if not future.done()]
        if not batch:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for actor, _ in batch:
                    pipe.incr(epoch_key(actor))
                    pipe.get(state_key(actor))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(exc)))
            return
        except BaseException as exc:  # cancelled at shutdown: do not leave callers hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"activation aborted: {exc!r}"))
            raise
        for i, (_, future) in enumerate(batch):
            if not future.done():  # the caller may have timed out
                future.set_result((int(results[2 * i]), results[2 * i + 1]))

    async def is_revoked(self, token_id: str) -> bool:
        with _redis_errors_as_unavailable():
            return bool(await self._redis.exists(revoked_key(token_id)))

    async def revoke(self, token_id: str, ttl_s: int) -> None:
        with _redis_errors_as_unavailable():
            await self._redis.set(revoked_key(token_id), b"1", ex=max(1, ttl_s))

    async def claim_drain(
        self, node: str, others: Sequence[str], *, ttl_s: float, force: bool
    ) -> tuple[bool, list[str]]:
        """Claim `node`'s drain unless no other node would be left serving; returns (claimed,
        the `others` with no drain claim of their own). Raises StoreUnavailable."""
        with _redis_errors_as_unavailable():
            result = await self._redis.eval(  # type: ignore[misc]
                DRAIN_CLAIM_SCRIPT, 1, DRAIN_CLAIMS_KEY, node, int(ttl_s * 1000), int(force), *others
            )
        return result[0] == 1, [n.decode() for n in result[1:]]

    async def clear_drain_claim(self, node: str) -> None:
        """A node that starts serves: any claim from an earlier drain of it is void."""
        with _redis_errors_as_unavailable():
            await self._redis.hdel(DRAIN_CLAIMS_KEY, node)  # type: ignore[misc]

    async def current_epoch(self, actor: str) -> int:
        with _redis_errors_as_unavailable():
            value = await self._redis.get(epoch_key(actor))
        return int(value or 0)

    async def load(self, actor: str) -> bytes | None:
        with _redis_errors_as_unavailable():
            blob: bytes | None = await self._redis.get(state_key(actor))  # type: ignore[assignment]
            return blob

    async def write_batch(self, writes: Sequence[Write]) -> list[bool]:
        """Fenced writes in one pipelined round trip; False where the epoch was stale.

        Calls carry many actors' keys at once, so this needs a single Redis (not a Redis
        Cluster, where the keys of different actors live on different shards).
        """
        return [r == 1 for r in await self._run_script(CAS_SCRIPT, writes, self._run_on_writer)]

    async def hand_over(self, writes: Sequence[Write]) -> list[int]:
        """Write each state (fenced, as `write_batch`; an empty blob writes nothing) and take
        the next epoch for its new owner, in one round trip. Returns the new epochs, 0 for
        each actor whose epoch was stale."""
        # Drains hand over to several owners at once: the pool's pipelines run side by side.
        results = await self._run_script(HANDOVER_SCRIPT, writes, self._run_pipelined)
        return [int(r) for r in results]  # type: ignore[call-overload]

    async def _run_script(self, script: str, writes: Sequence[Write], run: _Runner) -> list[object]:
        if not writes:
            return []
        try:
            calls = _script_calls(_sha1(script), writes)
            results = await run(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Not in Redis's script cache (first use, or a restart emptied it): load it
                # and send those calls again, in one round trip. Only those: a hand-over that
                # ran took an epoch, and must not take a second. (SCRIPT LOAD, not EVAL: from
                # Redis 7.4 on, scripts cached by EVAL may be evicted.)
                loaded, *redone = await run([("SCRIPT", "LOAD", script), *(calls[i] for i in missing)])
                if isinstance(loaded, Exception):
                    raise StoreUnavailable(f"SCRIPT LOAD failed: {loaded}")
                for i, result in zip(missing, redone, strict=True):
                    results[i] = result
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        flat: list[object] = []
        for result in results:
            if isinstance(result, Exception):
                raise StoreUnavailable(str(result))
            flat.extend(result)  # type: ignore[arg-type]
        return flat

    async def _run_pipelined(self, calls: list[tuple[Any, ...]]) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(*call)
            return list(await pipe.execute(raise_on_error=False))

    async def _run_on_writer(self, calls: list[tuple[Any, ...]]) -> list[object]:
        """The calls in one write on the writer connection; replies (or errors) in order.

        A connection that Redis closed while it sat idle (a restart, a timeout) fails on
        first use: then once more on a new one. Fenced writes are idempotent, so a write
        that did land before the connection broke may land again."""
        async with self._writer_lock:
            while True:
                if self._closed:
                    raise StoreUnavailable("store closed")
                reused = self._writer is not None
                conn = self._writer or self._redis.connection_pool.make_connection()
                self._writer = conn
                try:
                    if not conn.is_connected:
                        await conn.connect()
                        if self._writer is not conn:  # closed while connecting
                            raise StoreUnavailable("store closed")
                    await conn.send_packed_command(conn.pack_commands(calls), check_health=False)
                    results: list[object] = []
                    for _ in calls:
                        try:
                            results.append(await conn.read_response())
                        except ResponseError as exc:  # a script error: the others still answer
                            results.append(exc)
                    return results
                except BaseException as exc:
                    # Failed or cancelled mid-way: replies may still be on their way, so
                    # this connection is out of step for good.
                    self._writer = None
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    if not (reused and isinstance(exc, RedisConnectionError)):
                        raise


_Runner = Callable[[list[tuple[Any, ...]]], Awaitable[list[object]]]


@functools.cache
def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # how Redis names a cached script


def _script_calls(sha: str, writes: Sequence[Write]) -> list[tuple[Any, ...]]:
    """EVALSHA calls of up to CAS_CHUNK actors each: KEYS epoch, state; ARGV epoch, blob."""
    calls = []
    for start in range(0, len(writes), CAS_CHUNK):
        keys: list[str] = []
        args: list[int | bytes] = []
        for w in writes[start : start + CAS_CHUNK]:
            keys += (epoch_key(w.key), state_key(w.key))
            args += (w.epoch, w.blob)
        calls.append(("EVALSHA", sha, len(keys), *keys, *args))
    return calls
