"""THE decision function: where a packet of a flow goes. Pure; every driver calls it.

Rules (DESIGN.md), in order:
1. a pinned flow goes to its pin;
2. a stable bucket, or a listener not in transition, goes to the current table (no state);
3. an unstable bucket and a SYN (a new connection) goes to the current table, and the flow is
   pinned here and recorded at its owner;
4. an unstable bucket, not a SYN, unknown here: ask the owner (primary, then backup). If this
   mux holds a record for the flow (it is the owner, or the backup with a replica), it answers
   itself. The owner answers its record, or, having none, records and answers the oldest live
   table's backend (first writer wins).

The function returns an action; the driver performs it (forward, pin, send messages). Drivers
never decide themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from lbagent.core.ownership import Ownership
from lbagent.core.records import QueryResult, RecordKey, RecordStore
from lbagent.core.transition import ListenerTables

__all__ = [
    "Action",
    "AskOwner",
    "Forward",
    "Reason",
    "RecordAndForward",
    "decide",
    "decide_new_flows_batch",
    "decide_owner_unreachable",
    "decide_stable_batch",
    "owner_answer",
]


class Reason(StrEnum):
    PINNED = "pinned"
    STABLE = "stable"  # stable bucket or no transition
    NEW_FLOW = "new_flow"  # SYN in an unstable bucket
    LOCAL_RECORD = "local_record"  # this mux holds the record (owner or backup replica)
    OWNER_RECORD = "owner_record"  # owner had a record
    OWNER_OLD_TABLE = "owner_old_table"  # owner had none: recorded the oldest table's backend
    OWNER_UNREACHABLE = "owner_unreachable"  # primary and backup did not answer: stateless


@dataclass(frozen=True, slots=True)
class Forward:
    """Send to `backend`. `pin`: also pin the flow on this mux (it went through a decision)."""

    backend: str
    reason: Reason
    pin: bool = False


@dataclass(frozen=True, slots=True)
class RecordAndForward:
    """Send to `backend`, pin here, and have the owner record it (locally if we are the owner)."""

    backend: str
    owner: str
    backup: str | None
    reason: Reason


@dataclass(frozen=True, slots=True)
class AskOwner:
    """Hold the packet and query `owner`, then `backup`; `fallback` if neither answers."""

    owner: str
    backup: str | None
    fallback: str


Action = Forward | RecordAndForward | AskOwner


def decide(
    *,
    tables: ListenerTables,
    bucket: int,
    is_syn: bool,
    pin: str | None,
    local_record: str | None,
    owners: tuple[str, str | None],
    self_mux: str,
) -> Action:
    """Decide one packet. `pin`: this mux's pin for the flow; `local_record`: this mux's flow
    record (own or replica); `owners`: (primary, backup) of the bucket."""
    if pin is not None:
        return Forward(pin, Reason.PINNED)
    if not tables.in_transition or not tables.unstable[bucket]:
        return Forward(tables.current_backend(bucket), Reason.STABLE)
    primary, backup = owners
    if is_syn:
        return RecordAndForward(tables.current_backend(bucket), primary, backup, Reason.NEW_FLOW)
    if local_record is not None:
        return Forward(local_record, Reason.LOCAL_RECORD, pin=True)
    fallback = tables.fallback_backend(bucket)
    if primary == self_mux:
        # We are the owner and have no record: the owner's answer is the old table's backend.
        return RecordAndForward(fallback, primary, backup, Reason.OWNER_OLD_TABLE)
    return AskOwner(primary, backup, fallback)


def owner_answer(store: RecordStore, tables: ListenerTables | None, key: RecordKey, bucket: int,
                 hint: str, now: float) -> QueryResult:
    """What an owner answers a query: its record, or else it records and answers the oldest
    live table's backend. `hint` (the asker's fallback) is used only if this mux does not know
    the listener (for example it has not applied the generation yet)."""
    fallback = tables.fallback_backend(bucket) if tables is not None else hint
    return store.answer_query(key, bucket, fallback, now)


def decide_owner_unreachable(action: AskOwner) -> Forward:
    """Neither owner answered in time: the stateless answer (oldest table), pinned locally so
    the flow stays consistent on this mux."""
    return Forward(action.fallback, Reason.OWNER_UNREACHABLE, pin=True)


def decide_stable_batch(tables: ListenerTables, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rule 2 for many packets at once: (needs_decision mask, current backend id per packet).

    Packets where `needs_decision` is False go to ``tables.names[id]`` with no state; the others
    must go through `decide` one by one. Exact as long as pins exist only in unstable buckets,
    which drivers guarantee by dropping pins when their bucket becomes stable.
    """
    ids = tables.current_ids[buckets]
    if not tables.in_transition:
        return np.zeros(len(ids), dtype=bool), ids
    return tables.unstable[buckets], ids


def decide_new_flows_batch(tables: ListenerTables, buckets: np.ndarray,
                           ownership: Ownership) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rule 3's SYN case for many new flows (no pin) at once: (record mask, backend id, primary
    owner index, backup owner index), one entry per flow.

    Where `record` is True, `decide(..., is_syn=True, pin=None)` returns
    RecordAndForward(``tables.names[backend]``, ``ownership.muxes[primary]``, backup's name or
    None when its index is -1, NEW_FLOW). Where it is False the bucket is stable (or the listener
    is not in transition) and `decide` returns Forward(``tables.names[backend]``, STABLE): no
    record; its owner indexes are still filled in but mean nothing. The local record and the
    deciding mux play no part in a SYN's decision, so they are not inputs.
    """
    buckets = np.asarray(buckets, dtype=np.intp)
    if buckets.size and (buckets.min() < 0 or buckets.max() >= len(tables.current_ids)):
        raise ValueError(f"bucket outside 0..{len(tables.current_ids) - 1}")
    record, backend = decide_stable_batch(tables, buckets)
    return record, backend, ownership.primary[buckets], ownership.backup[buckets]
