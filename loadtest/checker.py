"""Closed-loop increment load with an invariant checker, for failure drills and benchmarks.

Each player's client sends `player.update {"incr": {"xp": 1}}` as fast as replies come
and counts the acknowledged ones; afterwards every player's stored `xp` must equal its
count: an update lost or applied twice shows up as a difference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.client import RingsideClient


@dataclass
class PlayerLoad:
    client: RingsideClient
    acked: int = 0
    errors: int = 0
    ack_times: list[float] = field(default_factory=list)


class IncrementLoad:
    def __init__(self, url: str, tokens: dict[str, str], *, record_times: bool = False) -> None:
        self.url = url
        self.tokens = tokens
        self.record_times = record_times
        self.players: dict[str, PlayerLoad] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        clients = await asyncio.gather(
            *(RingsideClient.connect(self.url, token) for token in self.tokens.values())
        )
        for player, client in zip(self.tokens, clients, strict=True):
            self.players[player] = PlayerLoad(client)
        self._tasks = [asyncio.create_task(self._run(p)) for p in self.players.values()]

    async def _run(self, load: PlayerLoad) -> None:
        args = {"incr": {"xp": 1}}
        while not self._stop.is_set():
            reply = await load.client.call("player.update", args)
            if reply.get("ok"):
                load.acked += 1
                if self.record_times:
                    load.ack_times.append(time.monotonic())
            else:
                load.errors += 1
                await asyncio.sleep(0.05)

    @property
    def total_acked(self) -> int:
        return sum(p.acked for p in self.players.values())

    async def wait_for_acks(self, more: int, timeout: float) -> None:
        target = self.total_acked + more
        deadline = time.monotonic() + timeout
        while self.total_acked < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {self.total_acked} of {target} acks")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await asyncio.gather(*(p.client.close() for p in self.players.values()))

    def disconnected(self) -> list[str]:
        return [name for name, p in self.players.items() if p.client.closed_with not in (None, 1000)]

    def mismatches(self, stored_xp: Callable[[str], int]) -> dict[str, tuple[int, int]]:
        """Players whose stored xp differs from their acknowledged increments: {player: (acked, stored)}."""
        out = {}
        for name, p in self.players.items():
            stored = stored_xp(name)
            if stored != p.acked:
                out[name] = (p.acked, stored)
        return out

    def longest_gap_after(self, t0: float, players: Sequence[str]) -> float:
        """For the given players: the longest wait from t0 until their first ack after t0."""
        worst = 0.0
        for name in players:
            after = [t for t in self.players[name].ack_times if t >= t0]
            worst = max(worst, (after[0] - t0) if after else float("inf"))
        return worst
