"""Live migration: hand actors to their new owners node to node (drain, scale-up).

For each batch of actors bound for one new owner:

1. freeze them between turns (messages for them wait in their queues);
2. one Redis round trip writes what was not yet durable and takes the next epoch for the
   new owner (`Store.hand_over`): from here on our epoch is dead, so nothing we could
   still do to these actors can reach Redis (invariant 1);
3. send the states with their new epochs to the new owner, who activates them at once,
   without a Redis round trip of its own (`adopt`), and wait for its answer (bounded);
4. deactivate them here: each waiting message fails with ActorMoved(new owner), so a
   gateway session re-attaches there (MOVED) and replays, and an actor call retries there.

Redis stays the fallback at every step: if the new owner does not take a state, it is in
Redis under the new epoch and loads on first use; if Redis does not answer, the actors
thaw and take the Redis way later (flush, leave, load).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from server.config import NodeSettings
from server.peers import PeerLost, Peers
from server.runtime import Activation, ActorRuntime, ActorState
from server.store import Store, StoreUnavailable, Write
from server.writebehind import WriteBehind

log = logging.getLogger("ringside.migration")

ADOPT_OP = "actors.adopt"  # the node-addressed message carrying handed-over states
PULL_OP = "actors.pull"  # a node that just joined asks a key's previous owner to hand it over
RELEASED_OP = "actors.released"  # written and let go under these epochs: older copies are stale
WAVE = 256  # actors frozen at a time: the first waves (sessions' actors) pause the least


class Migrator:
    def __init__(
        self,
        *,
        name: str,
        settings: NodeSettings,
        runtime: ActorRuntime,
        store: Store,
        write_behind: WriteBehind,
        peers: Peers,
        link_address: tuple[str, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._link_address = link_address  # sent with pulls: the source may not know us yet
        self._settings = settings
        self._runtime = runtime
        self._store = store
        self._wb = write_behind
        self._peers = peers
        self._clock = clock
        self.moved: dict[str, tuple[str, float]] = {}  # actor -> (its new owner, when)
        self.adopted_from: dict[str, str] = {}  # actor -> the node that handed it to us
        self.migrated_total = 0
        self.fenced_total = 0  # hand-overs refused: another node had taken the actor meanwhile
        self.pulls_total = 0
        self._pulls: dict[str, list[tuple[str, asyncio.Future[None]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the old owner's side -----------------------------------------------
    def redirect(self, key: str) -> str | None:
        """The node `key` migrated to, while we still point messages there."""
        entry = self.moved.get(key)
        return entry[0] if entry is not None else None

    async def migrate(self, keys: list[str], owner_of: Callable[[str], str], deadline: float) -> int:
        """Hand `keys` over to `owner_of(key)` in waves, in order (put those with sessions
        first: only a wave at a time is frozen). Actors busy in a turn are retried until
        `deadline`. Returns how many were handed."""
        handed = 0
        pending = keys
        while pending:
            busy: list[str] = []
            for start in range(0, len(pending), WAVE):
                wave = pending[start : start + WAVE]
                batches: dict[str, list[Activation]] = {}
                for act in self._runtime.freeze(wave):
                    owner = owner_of(act.key)
                    if owner == self.name:
                        self._runtime.thaw(act)
                    else:
                        batches.setdefault(owner, []).append(act)
                counts = await asyncio.gather(
                    *(self._hand_over(o, acts) for o, acts in batches.items()), return_exceptions=True
                )
                handed += sum(c for c in counts if isinstance(c, int))
                if any(isinstance(c, BaseException) for c in counts):
                    return handed  # Redis away: the rest take the Redis way once it is back
                actors = self._runtime.actors
                busy += [
                    k
                    for k in wave
                    if k in actors and actors[k].state is ActorState.ACTIVE and owner_of(k) != self.name
                ]
            pending = busy
            if not pending or self._clock() >= deadline:
                break
            await asyncio.sleep(0.005)  # busy actors: their turns end soon
        return handed

    async def _hand_over(self, owner: str, acts: list[Activation]) -> int:
        """Hand `acts` to `owner` in messages of at most migration_batch_bytes."""
        try:
            # Before the epochs move: a new owner we cannot reach yet (its address still
            # unknown here, say) gets them on a later try, or they take the Redis way.
            await self._peers.connect(owner, self._settings.migration_pull_timeout_s)
        except (PeerLost, TimeoutError):
            for act in acts:
                self._runtime.thaw(act)
            return 0
        handed = 0
        batch: list[tuple[Activation, bytes]] = []
        size = 0
        for act in acts:
            blob = act.data.to_blob()
            if batch and size + len(blob) > self._settings.migration_batch_bytes:
                handed += await self._hand_over_batch(owner, batch)
                batch, size = [], 0
            batch.append((act, blob))
            size += len(blob) + 64
        if batch:
            handed += await self._hand_over_batch(owner, batch)
        return handed

    async def _hand_over_batch(self, owner: str, batch: list[tuple[Activation, bytes]]) -> int:
        writes = [
            # A clean state is in Redis already: only the epoch moves on.
            Write(act.key, act.epoch, blob if self._wb.is_dirty(act.key) else b"")
            for act, blob in batch
        ]
        try:
            epochs = await self._store.hand_over(writes)
        except StoreUnavailable as exc:
            log.warning("hand-over failed; actors stay", extra={"actors": len(batch), "error": str(exc)})
            for act, _ in batch:
                self._runtime.thaw(act)
            raise
        entries: list[list[Any]] = []
        taken: list[Activation] = []
        for (act, blob), epoch in zip(batch, epochs, strict=True):
            if epoch == 0:  # another node activated it meanwhile: ours is stale
                self.fenced_total += 1
                self._runtime.fenced(act)
                continue
            entries.append([act.key, epoch, blob.decode()])
            taken.append(act)
        reply = None
        if entries:
            message = {"to": "node", "op": ADOPT_OP, "from": self.name, "args": {"actors": entries}}
            reply = self._peers.begin_call(owner, message)
        if reply is not None:
            # Sessions and waiting messages follow once the new owner has taken the states,
            # or after a short bound. A session that overtook its state there (re-attached
            # on our MOVED while the new owner was busy, its ring not yet showing us leave)
            # would load from Redis, where the hand-over wrote it under the new epoch:
            # correct, but no longer live, and the state we sent would be refused.
            with contextlib.suppress(PeerLost, TimeoutError):
                await asyncio.wait_for(asyncio.shield(reply), self._settings.migration_pull_timeout_s)
        now = self._clock()
        for act in taken:
            self.moved[act.key] = (owner, now)
            self._runtime.migrated(act, owner)
        self.migrated_total += len(taken)
        try:
            if entries and reply is None:
                raise PeerLost(f"no open link to {owner}")
            if reply is not None:
                await asyncio.wait_for(reply, self._settings.call_timeout_s)
        except (PeerLost, TimeoutError) as exc:
            # The states are in Redis under the new epochs: the owner loads them instead.
            log.warning("adopt call failed", extra={"node": owner, "error": str(exc)})
        return len(taken)

    async def give(self, keys: list[str], to: str) -> int:
        """A new owner asks for `keys` (it just joined): hand over those we hold. One that
        is being handed over already is waited for, so the asker has it when we answer."""
        deadline = self._clock() + self._settings.migration_timeout_s
        actors = self._runtime.actors
        while self._clock() < deadline and any(
            k in actors and actors[k].state is ActorState.MIGRATING for k in keys
        ):
            await asyncio.sleep(0.005)
        return await self.migrate([k for k in keys if k in actors], lambda key: to, deadline)

    # -- the new owner's side -------------------------------------------------
    def pull(self, source: str, key: str) -> asyncio.Future[None]:
        """Ask `source` to hand `key` over; done when it answered (or could not). Asks made
        in one loop iteration share one message per source."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        batch = self._pulls.setdefault(source, [])
        batch.append((key, future))
        if len(batch) == 1:
            loop.call_soon(self._send_pulls, source)
        return future

    def _send_pulls(self, source: str) -> None:
        batch = self._pulls.pop(source, [])
        if batch:
            task = asyncio.get_running_loop().create_task(self._run_pull(source, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_pull(self, source: str, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        args = {"actors": [k for k, _ in batch], "link": list(self._link_address)}
        message = {"to": "node", "op": PULL_OP, "from": self.name, "args": args}
        try:
            await self._peers.call(source, message, self._settings.migration_pull_timeout_s)
            self.pulls_total += len(batch)
        except (PeerLost, TimeoutError):
            pass  # they load from Redis
        finally:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def adopt(self, entries: Any, sender: str) -> int:
        """Activate the states `sender` handed over; returns how many were taken. One that
        is active here already (loaded from Redis first) keeps its newer epoch."""
        if not isinstance(entries, list):
            return 0
        adopted = 0
        for entry in entries:
            try:
                key, epoch, blob = entry
                if not (isinstance(key, str) and isinstance(epoch, int) and isinstance(blob, str)):
                    continue
                if self._runtime.adopt(key, epoch, blob.encode()):
                    adopted += 1
                    self.moved.pop(key, None)
                    self.adopted_from[key] = sender
            except Exception:  # a bad entry costs that actor only: it loads from Redis
                log.exception("adopt failed", extra={"entry": str(entry)[:200]})
        return adopted

    def is_adopted(self, key: str) -> bool:
        """Adopted from a node that is still in our ring: ours, though the ring says otherwise."""
        return key in self.adopted_from

    # -- bookkeeping ------------------------------------------------------------
    def on_ring_change(self, members: tuple[str, ...], owner_of: Callable[[str], str] | None) -> None:
        """Once a sender left the ring, the ring itself says where its actors are. With
        `owner_of` (we are not leaving), an actor that is ours again is not redirected."""
        self.adopted_from = {k: n for k, n in self.adopted_from.items() if n in members}
        if owner_of is not None:
            self.moved = {k: v for k, v in self.moved.items() if owner_of(k) != self.name}

    def forget(self, key: str) -> None:
        self.adopted_from.pop(key, None)

    def prune(self) -> None:
        cutoff = self._clock() - self._settings.migration_redirect_s
        if self.moved:
            self.moved = {k: v for k, v in self.moved.items() if v[1] >= cutoff}
