"""The actor runtime: activation, turn-based delivery, passivation, the activation cap.

Player operations are synchronous memory mutations, so an active actor runs a
message to completion the moment it is delivered: one message at a time, in
arrival order. While an actor activates (taking its epoch and loading its
state from Redis), messages wait in a bounded pending queue and run in order
when it becomes active.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from server.config import NodeSettings
from server.errors import ActorMoved, Overloaded, RingsideError, Unavailable
from server.player import PlayerState
from server.store import Store, StoreUnavailable
from server.writebehind import WriteBehind

log = logging.getLogger("ringside.runtime")


class ActorState(enum.Enum):
    ACTIVATING = "activating"
    ACTIVE = "active"
    MIGRATING = "migrating"  # frozen while its state travels to a new owner; messages wait
    DEACTIVATED = "deactivated"


TRANSITIONS: dict[ActorState, frozenset[ActorState]] = {
    ActorState.ACTIVATING: frozenset({ActorState.ACTIVE, ActorState.DEACTIVATED}),
    ActorState.ACTIVE: frozenset({ActorState.MIGRATING, ActorState.DEACTIVATED}),
    ActorState.MIGRATING: frozenset({ActorState.ACTIVE, ActorState.DEACTIVATED}),
    ActorState.DEACTIVATED: frozenset(),
}

# A turn: runs synchronously; may return an awaitable, and the actor takes no other
# message until it completes (a call to another actor, say).
Work = Callable[["Activation"], Awaitable[None] | None]
Fail = Callable[[RingsideError], None]
DurableWaiter = Callable[[bool], None]  # True: the state is in Redis; False: fenced off


class ActorData(Protocol):
    def to_blob(self) -> bytes: ...


class Activation:
    __slots__ = (
        "key",
        "state",
        "epoch",
        "data",
        "pending",
        "last_used",
        "flushed_seq",
        "version",
        "busy",
        "waiters",
        "timer",
    )

    def __init__(self, key: str, now: float) -> None:
        self.key = key
        self.state = ActorState.ACTIVATING
        self.epoch = 0
        self.data: Any = None  # PlayerState or GameState
        # A list, not a deque: an empty deque costs ~700 bytes per idle actor, and the
        # queue is short (max_pending_per_actor) and rarely used.
        self.pending: list[tuple[Work, Fail]] = []
        self.last_used = now
        self.flushed_seq = 0  # the player's applied_seq in the latest state known to be in Redis
        self.version = 0  # bumped by changes that wait for durability
        self.busy = False  # a turn awaits something
        self.waiters: list[tuple[int, DurableWaiter]] = []
        self.timer: asyncio.TimerHandle | None = None

    @property
    def player(self) -> PlayerState:
        data: PlayerState = self.data
        return data

    def wait_durable(self, waiter: DurableWaiter) -> None:
        """Call `waiter` once the state as it is now has been written (or refused)."""
        self.version += 1
        self.waiters.append((self.version, waiter))

    def when_durable(self, waiter: DurableWaiter) -> None:
        """Call `waiter` once every change that waits for durability has been written (or
        refused): now, when none is pending. For answers that change nothing but show what
        changed before them (a replay of an effect, a read)."""
        if self.waiters:
            self.waiters.append((self.version, waiter))
        else:
            waiter(True)

    def durable_upto(self, version: int, ok: bool) -> None:
        if not self.waiters:
            return
        ready = [w for v, w in self.waiters if v <= version]
        if ready:
            self.waiters = [(v, w) for v, w in self.waiters if v > version]
            for waiter in ready:
                waiter(ok)

    def transition(self, new: ActorState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"actor {self.key}: {self.state.value} -> {new.value} is not allowed")
        self.state = new


class ActorRuntime:
    def __init__(
        self,
        store: Store,
        write_behind: WriteBehind,
        settings: NodeSettings,
        *,
        clock: Callable[[], float],
        load: Callable[[str, bytes | None], ActorData],
        on_activated: Callable[[Activation], None],
        on_deactivated: Callable[[Activation, bool, str | None], None],
        handover_source: Callable[[str], str | None] = lambda key: None,
        pull: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._wb = write_behind
        self._settings = settings
        self._clock = clock
        self._load = load  # actor key and stored blob -> state object
        self._on_activated = on_activated
        self._on_deactivated = on_deactivated  # (activation, stale, node it migrated to)
        # Live migration, pull side: the node that may hold `key` live (we just joined),
        # and how to ask it to hand the actor over before we load it from Redis.
        self._handover_source = handover_source
        self._pull = pull
        # Activations reading their state from Redis: that read takes an epoch, which would
        # fence a hand-over arriving now. Until then, a hand-over completes an activation.
        self._loading: set[Activation] = set()
        self.actors: OrderedDict[str, Activation] = OrderedDict()  # least recently used first
        self._tasks: set[asyncio.Task[None]] = set()
        self.activations_total = 0
        self.passivations_total = 0
        self.stale_total = 0
        self.adopted_total = 0
        self.migrated_total = 0
        self._adopted_unattached: set[str] = set()  # adopted here, no session attached yet
        # Epochs of recent deactivations here: a hand-over that arrives after we loaded the
        # actor ourselves (a newer epoch) and let it go again must not bring back its state.
        self._recent_epochs: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.actors)

    def deliver(self, key: str, work: Work, fail: Fail) -> None:
        """Run `work` in the actor's turn, activating it first if needed.

        Raises Overloaded when the actor cannot be activated or its queue is full.
        """
        ready = self.ready(key)
        if ready is not None:
            self._run(ready, work)
            return
        act = self.actors.get(key)
        if act is None:
            act = self._begin_activation(key)
        act.last_used = self._clock()
        if len(act.pending) >= self._settings.max_pending_per_actor:
            raise Overloaded(f"actor {key} has {len(act.pending)} messages waiting")
        act.pending.append((work, fail))

    def ready(self, key: str) -> Activation | None:
        """The actor's activation, marked used, when a turn can run on it at once (active,
        nothing queued or running); else None, and the work goes through `deliver`. Lets
        the request path run a turn without making a closure for it."""
        act = self.actors.get(key)
        if act is None or act.state is not ActorState.ACTIVE or act.pending or act.busy:
            return None
        act.last_used = self._clock()
        self.actors.move_to_end(key)
        return act

    def attach(self, key: str, work: Work, fail: Fail) -> None:
        """Like `deliver`, but first make sure an existing activation still holds the
        current epoch: a session that moves back to this node must not meet the state
        it left behind here."""
        if key in self._adopted_unattached:
            # A state adopted by live migration holds the epoch its old owner just took
            # for us: current, no need to ask Redis.
            self._adopted_unattached.discard(key)
            self.deliver(key, work, fail)
            return
        self.deliver_current(key, work, fail)

    def deliver_current(self, key: str, work: Work, fail: Fail) -> None:
        """Like `deliver`, but an existing activation's epoch is checked in Redis first:
        one that another node has overtaken since is dropped, and `work` runs on a fresh
        load. One Redis round trip."""
        act = self.actors.get(key)
        if act is None or act.state is not ActorState.ACTIVE:
            self.deliver(key, work, fail)
            return
        act.pending.append((work, fail))
        if not act.busy:
            act.busy = True  # nothing runs until the epoch is checked
            self._spawn(self._revalidate(act))

    async def _revalidate(self, act: Activation) -> None:
        try:
            epoch = await asyncio.wait_for(
                self._store.current_epoch(act.key), self._settings.activation_timeout_s
            )
        except (StoreUnavailable, TimeoutError):
            epoch = act.epoch  # cannot tell; the fenced write still protects the state
        if act.state is not ActorState.ACTIVE:
            return
        act.busy = False
        if epoch == act.epoch:
            self._drain(act)
            return
        waiting, act.pending = act.pending, []
        self.drop_stale(act.key)
        fresh = self._begin_activation(act.key)
        fresh.pending = waiting

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _run(self, act: Activation, work: Work) -> None:
        self.end_turn(act, work(act))

    def end_turn(self, act: Activation, waiting: Awaitable[None] | None) -> None:
        """A turn's work returned: done, or (an awaitable) the turn lasts until that is, and
        the actor takes nothing else meanwhile."""
        if waiting is not None:
            act.busy = True
            self._spawn(self._finish_turn(act, waiting))

    async def _finish_turn(self, act: Activation, waiting: Awaitable[None]) -> None:
        try:
            await waiting
        except Exception:
            log.exception("actor turn failed", extra={"actor": act.key})
        finally:
            act.busy = False
            self._drain(act)

    def _drain(self, act: Activation) -> None:
        while act.pending and act.state is ActorState.ACTIVE and not act.busy:
            work, _ = act.pending.pop(0)
            self._run(act, work)

    def _begin_activation(self, key: str) -> Activation:
        if len(self.actors) >= self._settings.max_activations:
            self._evict_one()
        act = Activation(key, self._clock())
        self.actors[key] = act
        self._spawn(self._activate(act))
        return act

    def _evict_one(self) -> None:
        for key, act in self.actors.items():
            if (
                act.state is ActorState.ACTIVE
                and not act.pending
                and not act.busy
                and act.timer is None
                and not self._wb.is_dirty(key)
            ):
                self._deactivate(act, stale=False)
                return
        raise Overloaded(f"{len(self.actors)} actors active and none can passivate yet")

    async def _activate(self, act: Activation) -> None:
        if act.state is not ActorState.ACTIVATING:
            return  # adopted before this task first ran
        source = self._handover_source(act.key) if self._pull is not None else None
        if source is not None and self._pull is not None:
            with contextlib.suppress(Exception):  # whatever went wrong, Redis has the state
                await asyncio.wait_for(self._pull(source, act.key), self._settings.migration_pull_timeout_s)
            if act.state is not ActorState.ACTIVATING:
                return  # adopted while we asked
        self._loading.add(act)
        try:
            await self._load_from_store(act)
        finally:
            self._loading.discard(act)

    async def _load_from_store(self, act: Activation) -> None:
        try:
            epoch, blob = await asyncio.wait_for(
                self._store.activate(act.key), self._settings.activation_timeout_s
            )
            data = self._load(act.key, blob)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("activation failed", extra={"actor": act.key, "error": str(exc)})
            self._fail_activation(act, Unavailable("the state store is unreachable; try again"))
            return
        except Exception as exc:  # a corrupt blob must not leave the actor stuck activating
            log.exception("activation failed", extra={"actor": act.key})
            self._fail_activation(act, RingsideError(f"activation failed: {type(exc).__name__}"))
            return
        if act.state is not ActorState.ACTIVATING:
            return
        act.epoch = epoch
        act.data = data
        act.flushed_seq = getattr(data, "applied_seq", 0)
        act.transition(ActorState.ACTIVE)
        self.activations_total += 1
        self.actors.move_to_end(act.key)
        self._on_activated(act)
        self._drain(act)

    def _fail_activation(self, act: Activation, error: RingsideError) -> None:
        if self.actors.get(act.key) is act:
            del self.actors[act.key]
        if act.state is ActorState.ACTIVATING:
            act.transition(ActorState.DEACTIVATED)
        while act.pending:
            _, fail = act.pending.pop(0)
            fail(error)

    # -- live migration ---------------------------------------------------
    def freeze(self, keys: list[str]) -> list[Activation]:
        """Stop running turns for those of `keys` that are active and between turns, so
        their state can travel; messages for them wait. Returns the frozen activations."""
        frozen = []
        for key in keys:
            act = self.actors.get(key)
            if act is not None and act.state is ActorState.ACTIVE and not act.busy:
                act.transition(ActorState.MIGRATING)  # a timer firing now waits too
                frozen.append(act)
        return frozen

    def thaw(self, act: Activation) -> None:
        """The migration did not happen (Redis away): run here again."""
        if act.state is ActorState.MIGRATING:
            act.transition(ActorState.ACTIVE)
            self._drain(act)

    def migrated(self, act: Activation, node: str) -> None:
        """`act`'s state is in Redis under its new owner's epoch: deactivate it here; the
        messages that waited fail with ActorMoved(node) so their senders go there."""
        if act.state is ActorState.MIGRATING:
            self._wb.discard(act.key)
            act.durable_upto(act.version, True)  # the hand-over wrote the state
            self.migrated_total += 1
            self._deactivate(act, stale=False, moved_to=node)

    def fenced(self, act: Activation) -> None:
        """The hand-over found a newer epoch: another node has the actor; drop ours."""
        if act.state is ActorState.MIGRATING:
            self.stale_total += 1
            self._deactivate(act, stale=True)

    def adopt(self, key: str, epoch: int, blob: bytes) -> bool:
        """Activate `key` with a state its old owner handed over under `epoch` (taken for us,
        current unless we held a newer one since). False if it is stale, active here already,
        being read from Redis (that read fences `epoch`), or there is no room. An activation
        that has not asked Redis yet takes it, whether or not it asked for it: it may have
        begun on a session's attach a moment before its old owner's hand-over arrived."""
        if self._recent_epochs.get(key, 0) >= epoch:
            return False  # a stale hand-over: we held a newer epoch since
        act = self.actors.get(key)
        if act is not None and self.drop_older(key, epoch):
            act = None
        if act is not None:
            if act.state is not ActorState.ACTIVATING or act in self._loading:
                return False
            data = self._load(key, blob)
        else:
            if len(self.actors) >= self._settings.max_activations:
                return False
            data = self._load(key, blob)
            act = Activation(key, self._clock())
            self.actors[key] = act
            self._adopted_unattached.add(key)
        act.epoch = epoch
        act.data = data
        act.flushed_seq = getattr(data, "applied_seq", 0)
        act.transition(ActorState.ACTIVE)
        self.actors.move_to_end(key)
        self.adopted_total += 1
        self._on_activated(act)
        self._drain(act)
        return True

    def drop_older(self, key: str, epoch: int) -> bool:
        """Another node held `key` under `epoch` (a hand-over, or a state it wrote and let
        go): an idle activation of ours from an older epoch is stale, though it may not
        have written since to find out, and would answer reads from what it holds. Drop it
        unwritten; a busy one finds out with its next write."""
        act = self.actors.get(key)
        if act is None or act.state is not ActorState.ACTIVE or act.busy or act.epoch >= epoch:
            return False
        self.stale_total += 1
        extra = {"actor": key, "epoch": act.epoch, "newer": epoch}
        log.debug("older than its epoch elsewhere; deactivating", extra=extra)
        self._deactivate(act, stale=True)
        return True

    def drop_stale(self, key: str) -> None:
        """A write of `key` was refused: a newer activation exists elsewhere. Drop ours unwritten."""
        act = self.actors.get(key)
        if act is not None and act.state is not ActorState.MIGRATING:  # the migration decides
            self.stale_total += 1
            # Every ring change has some (two nodes held an actor for a moment): hundreds of
            # lines a drill at warning level; /metrics counts them (ringside_node_stale_epoch).
            log.debug("stale epoch; deactivating", extra={"actor": key, "epoch": act.epoch})
            self._deactivate(act, stale=True)

    def _deactivate(self, act: Activation, *, stale: bool, moved_to: str | None = None) -> None:
        if self.actors.get(act.key) is act:
            del self.actors[act.key]
            self._adopted_unattached.discard(act.key)
        if act.epoch:
            recent = self._recent_epochs
            recent[act.key] = act.epoch
            recent.move_to_end(act.key)
            if len(recent) > self._settings.migration_recent_epochs:
                recent.popitem(last=False)
        if stale:
            self._wb.discard(act.key)
        act.transition(ActorState.DEACTIVATED)
        if act.timer is not None:
            act.timer.cancel()
        act.durable_upto(act.version, False)
        error = ActorMoved(moved_to)
        while act.pending:
            _, fail = act.pending.pop(0)
            fail(error)
        self._on_deactivated(act, stale, moved_to)

    def passivate(self, key: str) -> bool:
        """Deactivate `key` if it is clean and idle right now; True if it was."""
        act = self.actors.get(key)
        if (
            act is None
            or act.state is not ActorState.ACTIVE
            or act.pending
            or act.busy
            or self._wb.is_dirty(key)
        ):
            return False
        self._deactivate(act, stale=False)
        self.passivations_total += 1
        return True

    def passivate_idle(self, now: float) -> int:
        """Deactivate clean actors idle past idle_timeout_s. Dirty ones wait for their flush."""
        cutoff = now - self._settings.idle_timeout_s
        idle = [
            act
            for act in self.actors.values()
            if act.state is ActorState.ACTIVE
            and act.last_used < cutoff
            and not act.pending
            and not act.busy
            and act.timer is None
            and not self._wb.is_dirty(act.key)
        ]
        for act in idle:
            self._deactivate(act, stale=False)
        self.passivations_total += len(idle)
        return len(idle)

    def set_timer(self, act: Activation, at_wall: float | None, work: Work) -> None:
        """Run `work` in the actor's turn at wall-clock time `at_wall` (None: no timer)."""
        if act.timer is not None:
            act.timer.cancel()
            act.timer = None
        if at_wall is None or act.state is not ActorState.ACTIVE:
            return

        def fire() -> None:
            act.timer = None
            if self.actors.get(act.key) is act:
                try:
                    self.deliver(act.key, work, lambda error: None)
                except RingsideError:
                    log.warning("timer dropped: actor busy", extra={"actor": act.key})

        delay = max(0.0, at_wall - time.time())
        act.timer = asyncio.get_running_loop().call_later(delay, fire)

    def drop_all(self) -> None:
        """Forget every activation without writing (this node was declared faulty)."""
        for act in list(self.actors.values()):
            if act.state is not ActorState.DEACTIVATED:
                self._wb.discard(act.key)
                self._deactivate(act, stale=True)
