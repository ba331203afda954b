"""How many buckets (hence what share of new flows) a backend-list change moves, computed with the
agents' own Maglev builder (lbagent.core.maglev), so the preview matches what every mux will run.

The movement functions are pure (no database, no I/O; only `current_table_size` reads the
setting). The agents' TableDriver builds each listener's table from the backends that serve
(state active, weight > 0) named "address:port", with the cluster's table size and seed 0; this
module does exactly the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lbagent.core.maglev import maglev_table

SERVING_STATE = "active"


def serving_backends(backends: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, int], ...]:
    """(name, weight) of the backends that get buckets, in list order, as the agents name them."""
    return tuple(
        (f"{b['address']}:{b['port']}", int(b.get("weight", 1)))
        for b in backends
        if b.get("admin_state", b.get("state", SERVING_STATE)) == SERVING_STATE
        and int(b.get("weight", 1)) > 0
    )


@lru_cache(maxsize=512)
def _table(serving: tuple[tuple[str, int], ...], table_size: int) -> np.ndarray:
    # Cached: a VIP page and a preview ask for the same few lists again and again.
    table = maglev_table([name for name, _ in serving], [w for _, w in serving], table_size=table_size)
    table.setflags(write=False)
    return table


def bucket_shares(backends: Sequence[Mapping[str, Any]], table_size: int) -> dict[str, float]:
    """{"address:port": share of the table's buckets} for every serving backend (empty: none serve)."""
    serving = serving_backends(backends)
    if not serving:
        return {}
    counts = np.bincount(_table(serving, table_size), minlength=len(serving))
    return {name: float(counts[i]) / table_size for i, (name, _) in enumerate(serving)}


def bucket_movement(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], table_size: int
) -> dict[str, Any]:
    """What a change from `before` to `after` does to the table.

    `moved_share`: the share of buckets whose backend changes (new flows landing elsewhere; with
    no serving backend on one side every bucket counts as moved, with none on either side 0).
    `moved_buckets`, `table_size`, and the per-backend shares before and after.
    """
    old, new = serving_backends(before), serving_backends(after)
    if not old and not new:
        moved = 0
    elif not old or not new:
        moved = table_size
    else:
        old_names = np.asarray([n for n, _ in old], dtype=object)[_table(old, table_size)]
        new_names = np.asarray([n for n, _ in new], dtype=object)[_table(new, table_size)]
        moved = int(np.count_nonzero(old_names != new_names))
    return {
        "table_size": table_size,
        "moved_buckets": moved,
        "moved_share": moved / table_size,
        "shares_before": bucket_shares(before, table_size),
        "shares_after": bucket_shares(after, table_size),
    }


def current_table_size() -> int:
    """The cluster's table size (PushSettings), or the agents' default before it exists."""
    from .models_sync import PushSettings  # the only database read here, kept out of the pure part

    size = PushSettings.objects.filter(pk=1).values_list("table_size", flat=True).first()
    return int(size) if size else 65537
