"""Actor-to-actor messaging and the game flows built on it.

- `call(key, op, ...)` reaches the actor `key` wherever the ring puts it: locally, or
  over a peer link; it retries across owner changes until `call_timeout_s`.
- A node that receives a message for an actor it does not own forwards it to the
  owner in its view (at most `max_hops` times).
- Game effects are group-committed: the game replies and pushes its events only once
  its new state is in Redis, so an event a client saw can never be renumbered by a
  failover. Effects carry `(sender, seq)`; the game skips what it already applied.
- Player actors push game events to their sessions in `seq` order and fill a gap
  (a lost push, a failover) from the game's log before pushing anything after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import mmh3
import orjson

from server.config import NodeSettings
from server.errors import ActorMoved, BadRequest, Overloaded, RingsideError, Unavailable, UnknownOp
from server.game import Event, GameLimits, GameState
from server.link import Link
from server.membership import Membership
from server.migration import ADOPT_OP, PULL_OP, RELEASED_OP, Migrator
from server.peers import PeerLost, Peers
from server.persister import Persister
from server.player import Request
from server.runtime import Activation, ActorRuntime
from server.wire import Frame, Kind
from server.writebehind import WriteBehind

log = logging.getLogger("ringside.messaging")

GAME_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
GAME_WRITES = frozenset({"game.create", "game.join", "game.leave", "game.action"})
GAME_READS = frozenset({"game.get", "game.events"})
GAME_OPS = GAME_WRITES | GAME_READS
RETRY_CODES = frozenset({"not_owner", "unavailable"})
GAME_ARGS = {"game.action": {"game", "action"}, "game.events": {"game", "after"}}  # others: {"game"}


class RemoteError(RingsideError):
    """An error another actor answered with; keeps its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Timeout(RingsideError):
    code = "timeout"


def _ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def _err(exc: RingsideError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}


def _event_type(event: dict[str, Any]) -> Any:
    action = event.get("action")
    return action.get("type") if isinstance(action, dict) else None


def _own_event(player_key: str, event: dict[str, Any], kind: str) -> bool:
    return _event_type(event) == kind and f"player:{event.get('from')}" == player_key


def stream_id(game: str) -> int:
    """The 64-bit id the gateway deduplicates a game's pushes by."""
    return mmh3.hash64(game.encode(), signed=False)[0]


class Messaging:
    def __init__(
        self,
        *,
        name: str,
        settings: NodeSettings,
        membership: Membership,
        peers: Peers,
        runtime: ActorRuntime,
        write_behind: WriteBehind,
        persister: Persister,
        migrator: Migrator,
        push: Callable[[str, int, int, bytes], None],
        game_id_key: bytes,
    ) -> None:
        self.name = name
        self._game_id_key = game_id_key
        self.settings = settings
        self.limits = GameLimits(
            max_players=settings.game_max_players,
            log_size=settings.game_log_size,
            max_action_bytes=settings.game_max_action_bytes,
            empty_close_s=settings.game_empty_close_s,
            max_duration_s=settings.game_max_duration_s,
        )
        self._membership = membership
        self._peers = peers
        self._runtime = runtime
        self._wb = write_behind
        self._persister = persister
        self._migrator = migrator
        self._push = push  # (actor key, event seq, stream id, frame bytes) -> to its sessions
        self._tasks: set[asyncio.Task[Any]] = set()
        self.forwarded_total = 0
        self.gaps_filled_total = 0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for the sends and calls under way to go out."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def owner(self, key: str) -> str:
        migrator = self._migrator
        if migrator.moved and (moved_to := migrator.redirect(key)) is not None:
            return moved_to
        if migrator.adopted_from and migrator.is_adopted(key):
            return self.name
        ring = self._membership.ring
        return ring.owner(key) if ring.members else self.name

    # -- calls and sends --------------------------------------------------
    async def call(self, key: str, op: str, args: dict[str, Any], *, sender: str, sender_seq: int) -> Any:
        """Run `op` on actor `key` wherever it lives; return its result or raise RingsideError."""
        message = {"to": key, "op": op, "args": args, "from": sender, "fseq": sender_seq, "hops": 0}
        deadline = time.monotonic() + self.settings.call_timeout_s
        delay = 0.02
        while True:
            owner = self.owner(key)
            remaining = deadline - time.monotonic()
            try:
                if owner == self.name:
                    async with asyncio.timeout(max(remaining, 0.01)):  # as a peer's call is
                        reply = await self.local(message)
                else:
                    reply = await self._peers.call(owner, message, max(remaining, 0.01))
            except (PeerLost, TimeoutError):
                reply = None
            if reply is not None:
                if reply.get("ok"):
                    return reply.get("result")
                error = reply.get("error", {})
                if error.get("code") not in RETRY_CODES:
                    raise RemoteError(error.get("code", "internal"), error.get("message", ""))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{key} did not answer in {self.settings.call_timeout_s}s; outcome unknown")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)

    async def local(self, message: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._deliver(message, future)
        return await future

    def _deliver(self, message: dict[str, Any], future: asyncio.Future[dict[str, Any]] | None) -> None:
        def work(act: Activation) -> Any:
            return self._apply(act, message, future)

        def fail(error: RingsideError) -> None:
            if future is not None and not future.done():
                future.set_result(_err(error))  # "unavailable": the caller retries
            elif future is None and isinstance(error, ActorMoved) and error.node:
                self._spawn(self._peers.send(error.node, message))  # a send follows its actor

        try:
            if message["op"] in GAME_READS and self._ring_settling():
                # The copy here may be stale: the runtime checks its epoch first.
                self._runtime.deliver_current(message["to"], work, fail)
            else:
                self._runtime.deliver(message["to"], work, fail)
        except RingsideError as exc:
            fail(exc)

    def _ring_settling(self) -> bool:
        return time.monotonic() - self._membership.ring_changed_at < self.settings.ring_settle_s

    def send(self, key: str, op: str, args: dict[str, Any]) -> None:
        """One-way effect to actor `key`; lost sends are repaired by the receiver's gap fill."""
        message = {"to": key, "op": op, "args": args, "from": "", "fseq": 0, "hops": 0}
        owner = self.owner(key)
        if owner == self.name:
            self._deliver(message, None)
        else:
            self._spawn(self._peers.send(owner, message))

    def tell_released(self, released: list[tuple[str, int, bool]]) -> None:
        """We let these actors go (key, our epoch, whether a timer ran): tell each one's
        owner, which drops a copy it holds from an older epoch (for a moment two nodes each
        thought they owned it; that copy has not written since to find out it is stale, and
        would answer reads from old state), then wakes the games among them, whose
        deadlines must keep running."""
        by_owner: dict[str, tuple[dict[str, int], list[str]]] = {}
        for key, epoch, timed in released:
            actors, wake = by_owner.setdefault(self.owner(key), ({}, []))
            actors[key] = epoch
            if timed:
                wake.append(key)
        for owner, (actors, wake) in by_owner.items():
            if owner != self.name:
                args = {"actors": actors, "wake": wake}
                message = {"to": "node", "op": RELEASED_OP, "from": self.name, "args": args}
                self._spawn(self._peers.send(owner, message))

    def on_peer_frame(self, link: Link, frame: Frame) -> None:
        """An ACTOR_CALL or ACTOR_SEND arrived from a peer."""
        is_call = frame.kind is Kind.ACTOR_CALL
        try:
            message = orjson.loads(frame.payload)
            key = message["to"]
            if not isinstance(key, str) or not isinstance(message.get("args"), dict):
                raise ValueError("bad message")
        except (ValueError, KeyError, TypeError):
            if is_call:
                link.send(Kind.ACTOR_REPLY, 0, frame.seq, 0, orjson.dumps(_err(BadRequest("bad message"))))
            return
        if key == "node":
            self._on_node_message(link, frame.seq if is_call else None, message)
            return
        owner = self.owner(key)
        if owner != self.name:
            if message.get("hops", 0) >= self.settings.max_hops:
                if is_call:
                    error = RemoteError("not_owner", f"{key} is not here; hop limit reached")
                    link.send(Kind.ACTOR_REPLY, 0, frame.seq, 0, orjson.dumps(_err(error)))
                return
            message["hops"] = message.get("hops", 0) + 1
            self.forwarded_total += 1
            if is_call:
                self._spawn(self._forward(link, frame.seq, owner, message))
            else:
                self._spawn(self._peers.send(owner, message))
            return
        if is_call:
            self._spawn(self._answer(link, frame.seq, message))
        else:
            self._deliver(message, None)

    def _on_node_message(self, link: Link, call_id: int | None, message: dict[str, Any]) -> None:
        """Live migration between nodes: states handed over to us, or asked of us."""
        op, sender, actors = message.get("op"), str(message.get("from", "")), message["args"].get("actors")

        def answer(result: dict[str, Any]) -> None:
            if call_id is not None:
                link.send(Kind.ACTOR_REPLY, 0, call_id, 0, orjson.dumps(result))

        if op == ADOPT_OP:
            answer(_ok({"adopted": self._migrator.adopt(actors, sender)}))
        elif op == RELEASED_OP and isinstance(actors, dict):
            for key, epoch in actors.items():
                if isinstance(key, str) and isinstance(epoch, int):
                    self._runtime.drop_older(key, epoch)
            for key in message["args"].get("wake", ()):
                if isinstance(key, str) and key.startswith("game:"):
                    self.send(key, "game.wake", {})
        elif op == PULL_OP and isinstance(actors, list) and sender:

            async def give() -> None:
                keys = [k for k in actors if isinstance(k, str)]
                # The asker may be so new that gossip has not told us its address yet.
                self._peers.learn(sender, message["args"].get("link"))
                answer(_ok({"handed": await self._migrator.give(keys, sender)}))

            self._spawn(give())
        else:
            answer(_err(UnknownOp(f"nodes take no {op!r}")))

    async def _forward(self, link: Link, call_id: int, owner: str, message: dict[str, Any]) -> None:
        try:
            reply = await self._peers.call(owner, message, self.settings.call_timeout_s)
        except (PeerLost, TimeoutError):
            reply = _err(RemoteError("not_owner", f"forward to {owner} failed"))
        link.send(Kind.ACTOR_REPLY, 0, call_id, 0, orjson.dumps(reply))

    async def _answer(self, link: Link, call_id: int, message: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.settings.call_timeout_s):  # past it, the caller gave up
                reply = await self.local(message)
        except TimeoutError:
            return
        link.send(Kind.ACTOR_REPLY, 0, call_id, 0, orjson.dumps(reply))

    # -- actors -----------------------------------------------------------
    def _apply(self, act: Activation, message: dict[str, Any], future: Any) -> Any:
        if act.key.startswith("game:"):
            self._apply_game(act, message, future)
            return None
        if message["op"] == "game.events.push":
            return self._receive_events(act, message["args"].get("events", []))
        if future is not None and not future.done():
            future.set_result(_err(UnknownOp(f"player actors take no {message['op']!r}")))
        return None

    def _apply_game(self, act: Activation, message: dict[str, Any], future: Any) -> None:
        game: GameState = act.data
        op = message["op"]
        if op == "game.wake":
            return  # activation alone re-armed its timer

        def answer(reply: dict[str, Any]) -> None:
            if future is not None and not future.done():
                future.set_result(reply)

        if op in GAME_WRITES and not self._wb.can_accept(act.key):
            answer(_err(Unavailable("state store unreachable; retry later")))
            return
        try:
            result, events = game.handle(
                op,
                message["args"],
                str(message.get("from", "")),
                int(message.get("fseq", 0)),
                time.time(),
                self.limits,
            )
        except RingsideError as exc:
            answer(_err(exc))
            return
        on_durable = lambda: answer(_ok(result))  # noqa: E731
        on_refused = lambda: answer(_err(Unavailable("moved")))  # noqa: E731
        if not events:
            # A replay's original, or the events a read shows, may still be on their way to
            # Redis: answered once they are there, as the original would have been.
            act.when_durable(lambda ok: on_durable() if ok else on_refused())
            return
        self._commit(act, events, on_durable, on_refused)

    def _commit(
        self,
        act: Activation,
        events: list[Event],
        on_durable: Callable[[], None],
        on_refused: Callable[[], None],
    ) -> None:
        """Write the game now (group commit); answer and publish once it is durable."""
        game: GameState = act.data
        self._wb.mark_dirty(act.key, urgent=True)
        self._persister.kick()

        def durable(ok: bool) -> None:
            if ok:
                on_durable()
                self._publish(game, events)
                self._announce_later(act, events[-1])
            else:
                on_refused()

        act.wait_durable(durable)
        self._arm_game_timer(act)

    def _publish(self, game: GameState, events: list[Event]) -> None:
        recipients = dict.fromkeys(game.players)
        for event in events:
            if event.sender:
                recipients.setdefault(event.sender)  # a leaving player sees its own "left"
        batch = [e.data(game.id) for e in events]
        for player in recipients:
            self.send(f"player:{player}", "game.events.push", {"events": batch})

    def _announce_later(self, act: Activation, event: Event) -> None:
        """Send `event`, just published, again once the game has been quiet a while: a push
        can be lost in a move, and the gap it leaves shows only when a later one arrives."""
        if self.settings.game_announce_s > 0 and self.settings.game_announces > 0:
            game: GameState = act.data
            game.announce = (time.time() + self.settings.game_announce_s, 0, event)
            self._arm_game_timer(act)

    def _arm_game_timer(self, act: Activation) -> None:
        game: GameState = act.data
        at = game.next_deadline(self.limits)
        if game.announce is not None and (at is None or game.announce[0] < at):
            at = game.announce[0]
        self._runtime.set_timer(act, at, self._on_game_timer)

    def _on_game_timer(self, act: Activation) -> None:
        game: GameState = act.data
        now = time.time()
        if game.announce is not None and now >= game.announce[0]:
            _, sent, event = game.announce
            self._publish(game, [event])
            sent += 1
            more = sent < self.settings.game_announces
            game.announce = (now + self.settings.game_announce_s * 2**sent, sent, event) if more else None
        events = game.on_timer(now, self.limits)
        if events:
            self._commit(act, events, lambda: None, lambda: None)
        else:
            self._arm_game_timer(act)

    def on_activated(self, act: Activation) -> None:
        if act.key.startswith("game:"):
            game: GameState = act.data
            self._arm_game_timer(act)
            if game.log:
                # Our previous activation may have died between the write and the pushes:
                # announce the latest event; a player that missed anything fills its gap.
                self._publish(game, [game.log[-1]])
                self._announce_later(act, game.log[-1])
        else:
            for game_id in list(act.player.games):
                self._runtime.deliver(act.key, self._sync_work(game_id), lambda error: None)

    def _sync_work(self, game_id: str) -> Callable[[Activation], Any]:
        return lambda act: self._sync(act, game_id)

    # -- player side ------------------------------------------------------
    def _receive_events(self, act: Activation, events: list[dict[str, Any]]) -> Any:
        changed = False
        for data in events:
            game_id, seq = data.get("game"), data.get("seq")
            if not isinstance(game_id, str) or not isinstance(seq, int):
                continue
            last = self._last_seen(act, game_id, data)
            if last is None or seq <= last:
                continue
            if seq > last + 1:
                return self._sync(act, game_id)  # fetches these too, in order
            self._take_event(act, game_id, data)
            changed = True
        if changed:
            self._wb.mark_dirty(act.key)
        return None

    def _last_seen(self, act: Activation, game_id: str, data: dict[str, Any]) -> int | None:
        """The last event of `game_id` pushed to the player, or None when it does not follow
        the game. Its own `joined` (a join whose reply timed out) and `left` make `games`
        follow what the game says, whatever became of the replies; within the bound: past
        it, the client, told `timeout`, finds itself in the game with `game.get` and leaves."""
        games = act.player.games
        last = games.get(game_id)
        if (
            last is None
            and _own_event(act.key, data, "joined")
            and len(games) < self.settings.max_games_per_player
        ):
            return int(data["seq"]) - 1
        return last

    def _take_event(self, act: Activation, game_id: str, data: dict[str, Any]) -> None:
        self._push_event(act, data)
        kind = _event_type(data)
        if kind == "ended" or (kind == "left" and f"player:{data.get('from')}" == act.key):
            act.player.games.pop(game_id, None)  # an ended game holds none of its slots
        else:
            act.player.games[game_id] = data["seq"]

    def _push_event(self, act: Activation, data: dict[str, Any]) -> None:
        frame = orjson.dumps({"ev": "game.event", "data": data})
        self._push(act.key, data["seq"], stream_id(data["game"]), frame)

    def fill_work(self, *, stream: int, after: int) -> Callable[[Activation], Any]:
        """The gateway says the client has a game's events up to `after` only."""

        def work(act: Activation) -> Any:
            for game_id, last in act.player.games.items():
                if stream_id(game_id) == stream:
                    act.player.games[game_id] = min(last, after)
                    return self._sync(act, game_id)
            return None

        return work

    async def _sync(self, act: Activation, game_id: str) -> None:
        """Push every event of `game_id` after the last one this player got, in order."""
        last = act.player.games.get(game_id)
        if last is None:
            return
        try:
            result = await self.call(
                f"game:{game_id}", "game.events", {"after": last}, sender=act.key, sender_seq=0
            )
        except RingsideError as exc:
            extra = {"actor": act.key, "game": game_id, "error": exc.message}
            log.warning("gap fill failed", extra=extra)
            return
        self.gaps_filled_total += 1
        if result.get("truncated"):
            note = {"ev": "game.truncated", "data": {"game": game_id, "after": last}}
            self._push(act.key, 0, 0, orjson.dumps(note))
        for data in result.get("events", []):
            last = self._last_seen(act, game_id, data)
            if last is not None and data["seq"] > last:
                self._take_event(act, game_id, data)
        self._wb.mark_dirty(act.key)

    async def game_request(self, act: Activation, seq: int, request: Request) -> Any:
        """A client's game.* request in its player's turn. Returns the result; raises RingsideError."""
        if request.op not in GAME_WRITES:
            return await self._game_request(act, seq, request)
        try:
            return await self._game_request(act, seq, request)
        finally:
            # The game keeps `seq` as this player's latest effect and takes any later one at or
            # below it for a replay: a new session numbers from applied_seq, so it must pass
            # `seq` whatever the outcome (a timeout may have applied it). Before, game.action
            # never moved it, and after a reconnect acknowledged actions were swallowed.
            self._mark_applied(act, seq)

    async def _game_request(self, act: Activation, seq: int, request: Request) -> Any:
        player = act.player
        pid = act.key.partition(":")[2]
        op, args = request.op, request.args
        if op == "game.create":
            mac = hmac.new(self._game_id_key, f"{pid}:{seq}".encode(), hashlib.sha256).hexdigest()
            game_id = f"g{mac[:16]}"
            self._check_room(player.games, game_id)
            result = await self.call(f"game:{game_id}", op, args, sender=pid, sender_seq=seq)
            self._joined(act, game_id, 0)
            await self._sync(act, game_id)
            return result
        given = args.get("game")
        if not isinstance(given, str) or not GAME_ID.match(given):
            raise BadRequest("game must be a game id string")
        unknown = set(args) - GAME_ARGS.get(op, {"game"})
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}")
        game_id = given
        key = f"game:{game_id}"
        if op == "game.join":
            self._check_room(player.games, game_id)
            result = await self.call(key, op, {}, sender=pid, sender_seq=seq)
            if game_id not in player.games:
                self._joined(act, game_id, result["seq"] - 1)
            await self._sync(act, game_id)
            return result
        if op == "game.leave":
            result = await self._game_write(act, pid, game_id, op, {}, seq)
            await self._sync(act, game_id)  # up to its own `left`, which the player sees too
            player.games.pop(game_id, None)
            return result
        if op == "game.action":  # the game says whether the player is in it, or it ended
            return await self._game_write(act, pid, game_id, op, {"action": args.get("action")}, seq)
        if op == "game.get":
            return await self.call(key, op, {}, sender=pid, sender_seq=0)
        if op == "game.events":
            return await self.call(key, op, {"after": args.get("after", 0)}, sender=pid, sender_seq=0)
        raise UnknownOp(f"unknown op {op!r}")

    async def _game_write(
        self, act: Activation, pid: str, game_id: str, op: str, args: dict[str, Any], seq: int
    ) -> Any:
        """A leave or an action, in the player's name. When the game says the player is not in
        it (a leave whose reply timed out, then applied; a game lost from Redis), the player's
        `games` forgets it too, or the stale entry would hold one of its game slots for good."""
        try:
            return await self.call(f"game:{game_id}", op, args, sender=pid, sender_seq=seq)
        except RemoteError as exc:
            if exc.code in ("not_in_game", "not_found") and act.player.games.pop(game_id, None) is not None:
                self._wb.mark_dirty(act.key)
            raise

    def _check_room(self, games: dict[str, int], game_id: str) -> None:
        if game_id not in games and len(games) >= self.settings.max_games_per_player:
            raise Overloaded(f"a player is in at most {self.settings.max_games_per_player} games")

    def _joined(self, act: Activation, game_id: str, last: int) -> None:
        act.player.games.setdefault(game_id, last)

    def _mark_applied(self, act: Activation, seq: int) -> None:
        act.player.applied_seq = max(act.player.applied_seq, seq)
        self._wb.mark_dirty(act.key)
