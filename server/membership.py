"""Gossip membership for a node or the gateway, and the ring it implies.

The ring is a pure function of the live members whose role is "node" (invariant 5):
every member with the same view computes the same owner for every key.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from server.config import ClusterConfig
from server.gossip import GossipEndpoint
from server.ring import HashRing
from server.swim import Member, MemberEvent, MemberState

log = logging.getLogger("ringside.membership")

RECENT_EVENTS = 50


class Membership:
    def __init__(
        self,
        config: ClusterConfig,
        *,
        name: str,
        host: str,
        port: int,
        meta: Mapping[str, Any],
        on_ring_change: Callable[[HashRing], None] = lambda ring: None,
        on_self_faulty: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self._on_ring_change = on_ring_change
        self._on_self_faulty = on_self_faulty
        own = (host, port)
        self.endpoint = GossipEndpoint(
            name,
            host,
            port,
            key=config.gossip_key,
            seeds=[addr for addr in config.gossip_seeds() if addr != own],
            meta=meta,
            config=config.swim,
            on_event=self._on_event,
        )
        self.ring = HashRing([])
        self.ring_changed_at = 0.0  # time.monotonic() of the last change
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.self_faulty_total = 0
        self.left = False

    async def start(self) -> None:
        await self.endpoint.start()

    async def leave(self, timeout: float = 3.0, linger: float | None = None) -> bool:
        """Gossip `leaving` (peers drop us from the ring at once) for `linger` (default
        `[swim] leave_linger`), then `left`, then stop gossiping."""
        if self.left:
            return True
        self.left = True
        return await self.endpoint.leave(timeout, linger)

    async def stop(self) -> None:
        self.left = True
        await self.endpoint.stop()

    def probe(self, name: str) -> None:
        """A link to `name` broke: ask the protocol to look now (it alone decides faulty)."""
        if name in self.endpoint.swim.members:
            self.endpoint.probe_now(name)

    def member(self, name: str) -> Member | None:
        return self.endpoint.swim.members.get(name)

    def link_address(self, name: str) -> tuple[str, int] | None:
        member = self.member(name)
        link = member.meta.get("link") if member is not None else None
        return (str(link[0]), int(link[1])) if link else None

    def announce_draining(self) -> None:
        """Tell peers (in our meta, with the next gossip) that we drain, before we leave."""
        swim = self.endpoint.swim
        swim.set_meta({**swim.members[self.name].meta, "draining": 1})

    def serving_nodes(self) -> list[str]:
        """Live nodes that have not announced a drain."""
        swim = self.endpoint.swim
        return [n for n in self.live_nodes() if not swim.members[n].meta.get("draining")]

    def live_nodes(self) -> list[str]:
        return [m.name for m in self.endpoint.swim.live_members() if m.meta.get("role") == "node"]

    def _on_event(self, event: MemberEvent) -> None:
        member = event.member
        previous = event.previous.value if event.previous else None
        self.recent.append(
            {"t": round(time.time(), 3), "member": member.name, "from": previous, "to": member.state.value}
        )
        log.info(
            "member changed",
            extra={
                "member": member.name,
                "from": previous,
                "to": member.state.value,
                "incarnation": member.incarnation,
            },
        )
        if member.name == self.name and member.state is MemberState.FAULTY and event.previous:
            self.self_faulty_total += 1
            log.warning("the cluster declared this member faulty; dropping state and rejoining")
            self._on_self_faulty()
        ring = HashRing(self.live_nodes())
        if ring != self.ring:
            self.ring = ring
            self.ring_changed_at = time.monotonic()
            log.info("ring changed", extra={"members": list(ring.members)})
            self._on_ring_change(ring)

    def status(self) -> dict[str, Any]:
        # The admin server answers from before gossip starts (the node's first Redis call).
        swim = self.endpoint.swim if self.endpoint.started else None
        members = list(swim.members.values()) if swim else []
        return {
            "state": "gossiping" if swim else "starting",
            "incarnation": swim.incarnation if swim else 0,
            "checksum": swim.checksum() if swim else "",
            "local_health": swim.local_health if swim else 0,
            "members": {m.name: m.state.value for m in members},
            "draining": sorted(m.name for m in members if m.meta.get("draining")),
            "ring": {n: round(s, 4) for n, s in self.ring.share().items()},
            "gossip_dropped": self.endpoint.dropped,
            "self_faulty": self.self_faulty_total,
            "recent": list(self.recent)[-10:],
        }
