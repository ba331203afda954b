"""Which mux owns a flow's state: a primary and a backup owner per bucket, the same on every mux.

The primary owner table is a Maglev table over the live muxes (sorted by name, so config order
does not matter) built with the cluster's `owner_seed`. The backup of bucket b is what the
primary table *would* say if b's primary were gone: the Maglev table over the live muxes minus
that primary, same seed. So when a primary fails, every mux rebuilds the table without it and
the new primary of each of its buckets is exactly the old backup, which already holds the
replicated records. (Maglev's small cascade can also move a few buckets between surviving muxes;
`moved_owners` lists them so their records can be handed over.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from lbagent.core.maglev import maglev_table

K = TypeVar("K")

__all__ = ["Ownership", "build_ownership", "hand_over_plan", "moved_owners", "moved_to", "pool_view",
           "records_for_member"]


@dataclass(frozen=True, eq=False)
class Ownership:
    """Primary and backup owner of each bucket over one live mux set."""

    muxes: tuple[str, ...]
    primary: np.ndarray  # int32 index into muxes, one per bucket
    backup: np.ndarray  # int32 index into muxes, -1 when only one mux is live
    owner_seed: int
    table_size: int

    def owners(self, bucket: int) -> tuple[str, str | None]:
        """(primary, backup or None) of a bucket."""
        if not 0 <= bucket < self.table_size:
            raise ValueError(f"bucket {bucket} outside 0..{self.table_size - 1}")
        b = int(self.backup[bucket])
        return self.muxes[int(self.primary[bucket])], (self.muxes[b] if b >= 0 else None)

    def replica_peer(self, bucket: int, me: str) -> str | None:
        """Where a record `me` holds for this bucket is copied: the other of (primary, backup)."""
        primary, backup = self.owners(bucket)
        other = backup if primary == me else primary
        return other if other != me else None

    def primary_names(self, buckets: np.ndarray) -> np.ndarray:
        """Primary owner names (object array) for many buckets."""
        return np.asarray(self.muxes, dtype=object)[self.primary[buckets]]


def build_ownership(live_muxes: Sequence[str], *, owner_seed: int, table_size: int) -> Ownership:
    """Ownership over the live muxes; identical on every mux that sees the same live set."""
    muxes = tuple(sorted(set(live_muxes)))
    if not muxes:
        raise ValueError("live_muxes: need at least one live mux")
    if len(muxes) != len(live_muxes):
        raise ValueError(f"live_muxes: duplicate mux names in {list(live_muxes)}")
    primary = maglev_table(muxes, table_size=table_size, seed=owner_seed)
    backup = np.full(table_size, -1, dtype=np.int32)
    if len(muxes) > 1:
        for p, name in enumerate(muxes):
            rest = tuple(m for m in muxes if m != name)
            without = maglev_table(rest, table_size=table_size, seed=owner_seed)
            # map indexes into `rest` back to indexes into `muxes`
            rest_to_all = np.array([muxes.index(m) for m in rest], dtype=np.int32)
            mine = primary == p
            backup[mine] = rest_to_all[without[mine]]
    primary.setflags(write=False)
    backup.setflags(write=False)
    return Ownership(muxes=muxes, primary=primary, backup=backup, owner_seed=owner_seed,
                     table_size=table_size)


def moved_owners(old: Ownership, new: Ownership) -> np.ndarray:
    """Buckets whose primary or backup owner (by name) differs between two ownerships."""
    if old.table_size != new.table_size:
        raise ValueError(f"table sizes differ: {old.table_size} vs {new.table_size}")

    def names(o: Ownership, idx: np.ndarray) -> np.ndarray:
        lookup = np.asarray((*o.muxes, ""), dtype=object)
        return lookup[np.where(idx >= 0, idx, len(o.muxes))]

    changed = (names(old, old.primary) != names(new, new.primary)) | (
        names(old, old.backup) != names(new, new.backup))
    return np.flatnonzero(changed)


def hand_over_plan(held: Iterable[tuple[K, int]], new: Ownership,
                   me: str) -> tuple[dict[str, list[K]], list[K]]:
    """After a live-set change: which held records go to which mux, and which `me` can drop.

    `held` yields (record id, bucket). Every record is sent to its new primary and backup (other
    than `me`; receivers keep the first copy they have), and dropped here if `me` is neither.
    """
    send: dict[str, list[K]] = {}
    drop: list[K] = []
    for rid, bucket in held:
        primary, backup = new.owners(bucket)
        for target in (primary, backup):
            if target is not None and target != me:
                send.setdefault(target, []).append(rid)
        if me not in (primary, backup):
            drop.append(rid)
    return send, drop


def pool_view(muxes: Iterable[str]) -> str:
    """A short digest of a pool's member set (order and duplicates ignored): two muxes agree on
    who owns what exactly when their views are equal (same seed and table size assumed)."""
    names = sorted(set(muxes))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _owns(own: Ownership, buckets: np.ndarray, name: str) -> np.ndarray:
    """For each bucket: is `name` its primary or backup owner under `own`?"""
    if name not in own.muxes:
        return np.zeros(len(buckets), dtype=bool)
    i = own.muxes.index(name)
    inside = buckets < own.table_size
    at = np.where(inside, buckets, 0)
    return inside & ((own.primary[at] == i) | (own.backup[at] == i))


def moved_to(buckets: np.ndarray, old: Ownership | None, new: Ownership, member: str) -> np.ndarray:
    """Mask of `buckets` that `member` owns (primary or backup) under `new` and did not under
    `old` (all it owns under `new` when `old` is None: a member that starts afresh holds nothing).

    What a mux must hand over to `member` after a membership change: the records it holds of
    these buckets. A bucket `member` already owned before needs nothing: it holds the record
    (it took it as owner, or its copy as backup)."""
    buckets = np.asarray(buckets, dtype=np.int64)
    mask = _owns(new, buckets, member)
    if old is not None:
        if old.table_size != new.table_size:
            raise ValueError(f"table sizes differ: {old.table_size} vs {new.table_size}")
        mask &= ~_owns(old, buckets, member)
    return mask


def records_for_member(held: Sequence[tuple[K, int]], old: Ownership | None, new: Ownership,
                       member: str, *, fresh: bool) -> list[K]:
    """The held records (id, bucket) to send `member` after the pool changed from `old` to `new`:
    those of buckets moved to it (`moved_to`), or, when `member` starts afresh (`fresh`: a
    joining mux, or a restarted one that lost its records), every record of a bucket it owns."""
    if not held:
        return []
    buckets = np.fromiter((b for _, b in held), dtype=np.int64, count=len(held))
    mask = moved_to(buckets, None if fresh else old, new, member)
    return [rid for (rid, _), keep in zip(held, mask.tolist(), strict=True) if keep]
