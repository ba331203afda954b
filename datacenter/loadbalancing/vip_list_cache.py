"""The VIP list served from a per-process cache while its tenants' VIP list versions stand still.

The VIP list is 60 % of the tenant clients' calls under load (issue 15), and its body changes far
less often than it is read: a VIP's row changes when it is created, renamed, deleted or its status
moves, not when its listeners' backends do. Every such write gives the tenant's
`VipListVersion` a new value, from database triggers (migration 0007), so no write path can
forget it: ORM saves, queryset updates, the admin, raw SQL.

A cached body is stored with the versions of the caller's tenants read *before* its rows were
read, and served only while those versions are still the current ones: a write committed after
the version read changes the version, so a body is never served after a write it does not show
(it may show a write newer than its versions, which only makes the next call a miss). The key is
what else the body depends on: the caller's tenants (from its memberships, read per request as
before), the path with its query string, the scheme and host (the `url` fields). Only the plain
list is cached: no filter parameters (their validation reads other tables), operators (they see
every tenant) uncached. DATACENTER_VIP_LIST_CACHE=0 turns it off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from django.conf import settings
from django.db import connection

from .models_sync import VipListVersion

# Query parameters that only page, order or format the list: the rows they select are VIP rows.
CACHEABLE_PARAMS = frozenset({"limit", "offset", "ordering", "format"})
MAX_ENTRIES = 512  # bodies kept per process (a tenant's page of 50 VIPs is ~20 KB)

Key = tuple[tuple[int, ...], str, str, str]
Versions = tuple[int, ...]


def enabled() -> bool:
    return getattr(settings, "DATACENTER_VIP_LIST_CACHE", True)


def cache_key(request, tenant_ids: list[int]) -> Key | None:
    """The key of this list call, or None when it is not cached (filters, no tenant)."""
    if not tenant_ids or not CACHEABLE_PARAMS.issuperset(request.query_params):
        return None
    return (tuple(tenant_ids), request.get_full_path(), request.scheme, request.get_host())


_VERSIONS_SQL = (
    f"SELECT tenant_id, version FROM {VipListVersion._meta.db_table} "  # noqa: S608 (a model's table)
    "WHERE tenant_id IN ({})"
)


def versions(tenant_ids: tuple[int, ...]) -> Versions:
    """The tenants' current VIP list versions (0: none written yet), in `tenant_ids`' order. One
    indexed query in plain SQL: this runs on every VIP list call, and compiling an ORM query
    costs more than running this one."""
    with connection.cursor() as cursor:
        cursor.execute(_VERSIONS_SQL.format(", ".join(["%s"] * len(tenant_ids))), list(tenant_ids))
        found = dict(cursor.fetchall())
    return tuple(found.get(tenant_id, 0) for tenant_id in tenant_ids)


class VipListCache:
    """Bodies by key, each with the versions it was read under; least recently used dropped."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, tuple[Versions, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Key, current: Versions) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != current:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: Key, read_under: Versions, body: Any) -> None:
        with self._lock:
            self._entries[key] = (read_under, body)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


cache = VipListCache()
