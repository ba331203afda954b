"""A mux daemon's side of pool membership: joining, leaving and re-deriving owners (issue 12).

The operator changes the pool by editing `cluster.muxes` in every mux's desired state (a mux
added, or removed). Each mux then:

* switches its slow path to the ownership of the new member set (`lbagent.core.ownership`);
* as a member: asks every other member for the records it now owns (SYNC, pull). A member at the
  same view sends the records of buckets moved to the asker since its own previous view (all the
  asker owns when it starts afresh: a joining or restarted mux), waits for their
  acknowledgements and answers "ok"; one still at another view answers "other_view" and is asked
  again. Until every member has answered (or `SYNC_HOLD_S` passed) a mux that starts holds its
  BGP announcements: traffic reaches it only once it holds its records (make before break);
* as a mux removed from the pool: sends every record it holds to the bucket's new primary and
  backup owners (REPLICATE, acknowledged), and only then withdraws its routes. It keeps answering
  owner queries until it is stopped (peers still at the old view may ask it).

A departed mux stays a known sender for `DEPARTED_GRACE_S`, so its hand-over is accepted by
members that switched before it did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

from lbagent.core.ownership import Ownership, pool_view
from lbagent.dataplane.slowpath import PeerBridge, SlowPath
from lbagent.state import Mux

log = logging.getLogger("lbagent.pool")

SYNC_HOLD_S = 20.0  # a starting mux announces after this even if a member keeps another view
# ... and after this when a member never answered at all: it is down (a pool of two whose other
# mux is dead must not keep its only live mux's routes back for long)
SYNC_SILENT_S = 5.0
SYNC_TIMEOUT_S = 2.0  # one SYNC's answer (the records are sent before it)
SYNC_RETRY_S = 0.2
DEPARTED_GRACE_S = 120.0

__all__ = ["PoolMembership"]


class PoolMembership:
    """Tracks the member set, runs SYNCs and a leaving mux's hand-over on the peer thread, and
    tells the daemon what to do with its routes (`route_mode`)."""

    def __init__(self, node: str, slowpath: SlowPath, bridge: PeerBridge | None, *,
                 handover: bool = True) -> None:
        self.node = node
        self.handover = handover  # False: switch owners only (the baseline `--no-pool-handover`)
        self.slowpath = slowpath
        self.bridge = bridge
        self.members: tuple[Mux, ...] = ()
        self.view = ""
        self._task: Future | None = None
        self._holding = False  # a starting mux waits for its SYNCs before announcing
        self._left = False  # this mux is not a member; True once its records are handed over
        self._departed: dict[str, tuple[tuple[str, int], float]] = {}  # name -> (address, until)
        self.changes = 0
        self.synced_members = 0  # members that answered "ok" to the last round of SYNCs
        self.sync_rounds = 0
        self.last_change_s = 0.0  # how long the last change took (switch, SYNCs or hand-over)

    @property
    def member(self) -> bool:
        return any(m.name == self.node for m in self.members)

    def route_mode(self) -> str:
        """"announce" (normal), "hold" (change no route yet: a starting mux before its SYNCs, a
        leaving mux before its hand-over) or "withdraw" (left the pool, records handed over)."""
        if self.member:
            return "hold" if self._holding else "announce"
        return "withdraw" if self._left else "hold"

    def change(self, members: Sequence[Mux], ownership: Ownership, *, starting: bool) -> None:
        """Apply a member set (at start, and whenever `cluster.muxes` changes)."""
        members = tuple(members)
        if members == self.members and not starting:
            return
        now = time.monotonic()
        gone = {m.name: (m.address, m.peer_port) for m in self.members}
        for m in members:
            gone.pop(m.name, None)
            self._departed.pop(m.name, None)
        gone.pop(self.node, None)
        for name, addr in gone.items():
            self._departed[name] = (addr, now + DEPARTED_GRACE_S)
        self.members = members
        self.view = pool_view(m.name for m in members)
        self.changes += 1
        self.slowpath.set_ownership(ownership)
        self.refresh_peers()
        if self._task is not None:
            self._task.cancel()
        names = sorted(m.name for m in members)
        log.info("pool view %s: %d member(s) %s%s", self.view, len(names), ", ".join(names),
                 "" if self.member else f" ({self.node} is not one of them: handing its records over)")
        self._holding = starting and self.member
        self._left = False
        if self.bridge is None or not self.handover:
            self._holding = False
            self._left = not self.member
            return
        job = self._sync(fresh=starting) if self.member else self._leave()
        self._task = asyncio.run_coroutine_threadsafe(job, self.bridge._loop)
        self._task.add_done_callback(_log_failure)

    def expire_departed(self) -> None:
        """Drop departed muxes whose grace is over from the address book (cheap when none)."""
        if self._departed and min(until for _addr, until in self._departed.values()) <= time.monotonic():
            self.refresh_peers()

    def refresh_peers(self) -> None:
        """The peer node's address book: the members, plus departed muxes within their grace."""
        if self.bridge is None:
            return
        now = time.monotonic()
        self._departed = {n: v for n, v in self._departed.items() if v[1] > now}
        peers = {m.name: (m.address, m.peer_port) for m in self.members if m.name != self.node}
        for name, (addr, _until) in self._departed.items():
            peers.setdefault(name, addr)
        self.bridge.peer.peers = peers  # one assignment: the peer thread sees the old or the new dict

    async def _sync(self, *, fresh: bool) -> None:
        t0 = time.monotonic()
        view = self.view
        others = [m.name for m in self.members if m.name != self.node]
        assert self.bridge is not None
        peer = self.bridge.peer

        async def one(name: str) -> bool:
            answered = False
            while time.monotonic() - t0 < (SYNC_HOLD_S if answered else SYNC_SILENT_S):
                status = await peer.sync(name, view, fresh=fresh, timeout_s=SYNC_TIMEOUT_S)
                if status == "ok":
                    return True
                answered = answered or status is not None
                await asyncio.sleep(SYNC_RETRY_S)
            return False

        results = await asyncio.gather(*(one(n) for n in others))
        self.sync_rounds += 1
        self.synced_members = sum(results)
        self.last_change_s = time.monotonic() - t0
        missing = [n for n, ok in zip(others, results, strict=True) if not ok]
        if missing:
            log.warning("pool view %s: no records from %s (silent for %.0f s, or at another view for "
                        "%.0f s); serving without them", view, ", ".join(missing), SYNC_SILENT_S, SYNC_HOLD_S)
        else:
            log.info("pool view %s: records synced with %d member(s) in %.2f s", view, len(others),
                     self.last_change_s)
        self._holding = False

    async def _leave(self) -> None:
        t0 = time.monotonic()
        assert self.bridge is not None
        plan = self.slowpath.leaving_hand_over()
        peer = self.bridge.peer
        results = await asyncio.gather(*(peer.hand_over(to, batch, attempts=8) for to, batch in plan.items()))
        sent = sum(len(b) for b in plan.values())
        peer.counters.handed_over += sent
        self.last_change_s = time.monotonic() - t0
        failed = [to for to, ok in zip(plan, results, strict=True) if not ok]
        if failed:
            log.error("left the pool: hand-over to %s not acknowledged; withdrawing anyway",
                      ", ".join(failed))
        log.info("left the pool: %d record(s) handed over to %d member(s) in %.2f s; withdrawing routes",
                 sent, len(plan), self.last_change_s)
        self._left = True


def _log_failure(task: Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pool change failed", exc_info=task.exception())
