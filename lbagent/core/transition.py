"""A listener's tables over time: the current generation plus the old ones still draining.

A transition starts when a listener gets a new generation: the table that was current becomes
an old table with a drain deadline. It ends at the deadline: the old table goes away, and when
no old table is left the listener is back to stateless (its flow records and pins can go).

Two changes inside one drain window: we keep a *chain* of old tables, each with its own
deadline, rather than only the last one. Decisions need two things per bucket, and we compose
them from the chain on every change:

* ``unstable[b]``: some old table still alive disagrees with the current one at b. A bucket
  that changed in the first change but not the second is still unstable, because flows that
  predate the first change still live on the first table's backend.
* ``fallback[b]``: the backend of the *oldest* live table. An owner asked about a flow it has no
  record of answers this. Such a flow predates every change in the window: flows that started
  during the window in an unstable bucket were recorded at their SYN, and in a bucket that was
  stable across a change the tables agree, so the oldest table is right in every case.

Composing only the pair (current, last old) would be wrong: after gen 4 -> 5 -> 6 within one
window, a flow from gen 4 in a bucket where 5 and 6 agree but 4 differs would look stable and
break. Keeping the chain also lets each old table expire at its own deadline (deadlines need not
be monotonic when drain timeouts change). Backends are compared by name, not table index.

What a drain deadline ends (Octavia's semantics, `after_deadlines`): the connections of backends
that are gone (removed, or drained to weight 0) end at their deadline; every other connection
lives on. So when an old table's deadline passes it is not simply dropped: its buckets that
point at a backend still in service are kept as a *lingering* old table (deadline infinity), so
flows whose bucket moved keep their pins and records and still get their owner's answer an hour
later; its buckets of ended backends become the current table's (stable: no state). A lingering
table goes when the daemon sees no flow of the listener left on a moved bucket
(`without_lingering`), never on a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lbagent.core.maglev import DEFAULT_TABLE_SIZE, maglev_table

__all__ = ["GenerationTable", "ListenerTables", "OldTable", "build_generation"]


@dataclass(frozen=True, eq=False)
class GenerationTable:
    """One generation's Maglev table: `table[b]` indexes `backends`."""

    generation: int
    backends: tuple[str, ...]
    table: np.ndarray

    @property
    def table_size(self) -> int:
        return len(self.table)

    def bucket_backends(self) -> np.ndarray:
        """Backend name of every bucket (object array)."""
        return np.asarray(self.backends, dtype=object)[self.table]


def build_generation(
    generation: int,
    backends: Sequence[str],
    weights: Sequence[int] | None = None,
    table_size: int = DEFAULT_TABLE_SIZE,
) -> GenerationTable:
    """Build a generation's table from its ordered backends (the names drivers forward to)."""
    if not isinstance(generation, int) or generation < 0:
        raise ValueError(f"generation: {generation!r} must be a non-negative integer")
    table = maglev_table(list(backends), weights, table_size)
    table.setflags(write=False)
    return GenerationTable(generation=generation, backends=tuple(backends), table=table)


@dataclass(frozen=True, eq=False)
class OldTable:
    table: GenerationTable
    drain_deadline: float  # math.inf: lingering (its drain is over, flows of moved buckets live on)

    @property
    def lingering(self) -> bool:
        return math.isinf(self.drain_deadline)


@dataclass(frozen=True, eq=False)
class ListenerTables:
    """Current table, live old tables (newest first) and the per-bucket composition."""

    current: GenerationTable
    old: tuple[OldTable, ...] = ()
    # composed views (filled in __post_init__)
    names: tuple[str, ...] = field(init=False)
    current_ids: np.ndarray = field(init=False)
    fallback_ids: np.ndarray = field(init=False)
    unstable: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        for o in self.old:
            if o.table.table_size != self.current.table_size:
                raise ValueError(f"old generation {o.table.generation} has table size "
                                 f"{o.table.table_size}, current has {self.current.table_size}")
        names: list[str] = list(self.current.backends)
        index = {n: i for i, n in enumerate(names)}
        for o in self.old:
            for n in o.table.backends:
                if n not in index:
                    index[n] = len(names)
                    names.append(n)

        def ids(g: GenerationTable) -> np.ndarray:
            remap = np.array([index[n] for n in g.backends], dtype=np.int32)
            return remap[g.table]

        current_ids = ids(self.current)
        unstable = np.zeros(len(current_ids), dtype=bool)
        fallback_ids = current_ids
        for o in self.old:
            o_ids = ids(o.table)
            unstable |= o_ids != current_ids
            fallback_ids = o_ids  # ends as the oldest
        for arr in (current_ids, fallback_ids, unstable):
            arr.setflags(write=False)
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "current_ids", current_ids)
        object.__setattr__(self, "fallback_ids", fallback_ids)
        object.__setattr__(self, "unstable", unstable)

    # --- lifecycle (each returns a new ListenerTables) -------------------------------------

    @property
    def generation(self) -> int:
        return self.current.generation

    @property
    def in_transition(self) -> bool:
        return bool(self.old)

    def with_generation(self, new: GenerationTable, *, drain_deadline: float) -> ListenerTables:
        """Start a transition to `new`; the current table drains until `drain_deadline`.

        Re-applying the current generation is a no-op; an older generation is refused.
        """
        if new.generation == self.current.generation:
            return self
        if new.generation < self.current.generation:
            raise ValueError(f"generation {new.generation} is older than the current "
                             f"{self.current.generation}")
        if new.table_size != self.current.table_size:
            raise ValueError(f"generation {new.generation} has table size {new.table_size}, "
                             f"current has {self.current.table_size}")
        return ListenerTables(current=new, old=(OldTable(self.current, drain_deadline), *self.old))

    def expired(self, now: float) -> ListenerTables:
        """Drop old tables whose drain deadline has passed (at `now`)."""
        keep = tuple(o for o in self.old if o.drain_deadline > now)
        if len(keep) == len(self.old):
            return self
        return ListenerTables(current=self.current, old=keep)

    def next_deadline(self) -> float | None:
        return min((o.drain_deadline for o in self.old if not o.lingering), default=None)

    @property
    def draining(self) -> bool:
        """Some old table's drain deadline is still ahead (not only lingering tables)."""
        return any(not o.lingering for o in self.old)

    @property
    def lingering(self) -> bool:
        return any(o.lingering for o in self.old)

    def alive_backends(self) -> frozenset[str]:
        """Backends whose connections may still live: those the current table gives buckets, and
        every backend of an old table (a draining one keeps its flows until its deadline; a
        lingering one holds only backends that were alive when its drain ended)."""
        alive = {self.current.backends[i] for i in np.unique(self.current.table)}
        for o in self.old:
            alive.update(o.table.backends[i] for i in np.unique(o.table.table))
        return frozenset(alive)

    def after_deadlines(self, now: float) -> ListenerTables:
        """Old tables whose drain deadline has passed (at `now`) become lingering tables that
        keep only the buckets of backends still alive; the buckets of ended backends (and a
        table left with no bucket that differs from the current one) go. Idempotent."""
        if not any(not o.lingering and o.drain_deadline <= now for o in self.old):
            return self
        draining = tuple(o for o in self.old if not o.lingering and o.drain_deadline > now)
        alive = ListenerTables(current=self.current, old=draining).alive_backends()
        cur_names = np.asarray(self.current.backends, dtype=object)[self.current.table]
        kept: list[OldTable] = []
        for o in self.old:
            if o in draining:
                kept.append(o)
                continue
            names = np.asarray(o.table.backends, dtype=object)[o.table.table]
            ended = ~np.isin(names, list(alive))
            residual = np.where(ended, cur_names, names)
            if np.array_equal(residual, cur_names):
                continue  # nothing of this table outlives its drain
            backends = tuple(dict.fromkeys(residual.tolist()))
            index = {n: i for i, n in enumerate(backends)}
            table = np.fromiter((index[n] for n in residual), dtype=self.current.table.dtype,
                                count=len(residual))
            table.setflags(write=False)
            kept.append(OldTable(GenerationTable(o.table.generation, backends, table), math.inf))
        return ListenerTables(current=self.current, old=tuple(kept))

    def without_lingering(self) -> ListenerTables:
        """Drop the lingering tables (no flow of a moved bucket is left): back to stateless once
        no draining table remains either."""
        if not self.lingering:
            return self
        return ListenerTables(current=self.current, old=tuple(o for o in self.old if not o.lingering))

    # --- per-bucket questions --------------------------------------------------------------

    def is_stable(self, bucket: int) -> bool:
        return not self.unstable[bucket]

    def current_backend(self, bucket: int) -> str:
        return self.names[self.current_ids[bucket]]

    def fallback_backend(self, bucket: int) -> str:
        """What an owner answers for a flow it has no record of: the oldest live table."""
        return self.names[self.fallback_ids[bucket]]

    def unstable_buckets(self) -> np.ndarray:
        return np.flatnonzero(self.unstable)
