"""Flow records kept by owner muxes during transitions: quota, idle expiry, replicas, counters.

A record says "this flow goes to that backend" for a flow in an unstable bucket. The first
writer wins: once a flow has a record, later writes and queries get the recorded backend. A mux
holds at most `max_records` (own records plus replicas); past that it stores nothing and gives
the stateless answer, counted as `degraded`. Times are passed in (`now`, seconds), never read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["FlowKey", "FlowRecord", "QueryResult", "RecordCounters", "RecordKey", "RecordStore"]

# (src ip, dst ip, proto, src port, dst port), addresses as integers
FlowKey = tuple[int, int, int, int, int]
# (listener id, flow)
RecordKey = tuple[int, FlowKey]


@dataclass(slots=True)
class FlowRecord:
    backend: str
    bucket: int
    created_s: float
    last_seen_s: float
    replica: bool  # held as the backup owner's copy


@dataclass(slots=True)
class RecordCounters:
    stored: int = 0  # records created here as owner
    replicas_stored: int = 0  # copies received as backup owner
    degraded: int = 0  # stateless answers because the quota was full
    queries: int = 0  # owner queries answered
    hits: int = 0  # ... of which found a record
    misses: int = 0  # ... of which had none (answered the old table, recorded)
    conflicts: int = 0  # writes refused because another writer came first
    expired: int = 0  # removed for idleness
    dropped: int = 0  # removed because their transition ended


@dataclass(frozen=True, slots=True)
class QueryResult:
    backend: str
    found: bool  # an existing record answered
    stored: bool  # a new record was created
    degraded: bool  # over quota: answered without storing


@dataclass
class RecordStore:
    max_records: int
    idle_timeout_s: float = 300.0
    counters: RecordCounters = field(default_factory=RecordCounters)
    _records: dict[RecordKey, FlowRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_records, int) or self.max_records < 0:
            raise ValueError(f"max_records: {self.max_records!r} must be a non-negative integer")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s: {self.idle_timeout_s!r} must be positive")

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[tuple[RecordKey, FlowRecord]]:
        return iter(list(self._records.items()))

    def get(self, key: RecordKey, now: float) -> str | None:
        """The recorded backend (refreshing its idle timer), or None."""
        rec = self._records.get(key)
        if rec is None:
            return None
        rec.last_seen_s = now
        return rec.backend

    def peek(self, key: RecordKey) -> FlowRecord | None:
        return self._records.get(key)

    def put_first(self, key: RecordKey, backend: str, bucket: int, now: float, *,
                  replica: bool = False) -> tuple[str, bool]:
        """Record unless a record exists (first writer wins). Returns (winning backend, stored).

        Over quota nothing is stored and `backend` is returned (a degraded, stateless answer).
        """
        rec = self._records.get(key)
        if rec is not None:
            rec.last_seen_s = now
            if rec.backend != backend:
                self.counters.conflicts += 1
            if not replica:
                rec.replica = False  # we are (now) its owner
            return rec.backend, False
        if len(self._records) >= self.max_records:
            self.counters.degraded += 1
            return backend, False
        self._records[key] = FlowRecord(backend, bucket, now, now, replica)
        if replica:
            self.counters.replicas_stored += 1
        else:
            self.counters.stored += 1
        return backend, True

    def put_first_many(self, keys: Sequence[RecordKey], backends: Sequence[str], buckets: Sequence[int],
                       now: float, *, replica: bool = False) -> tuple[list[str], list[bool]]:
        """`put_first` for many records in order: (winning backends, stored flags), exactly what
        calling `put_first` on each in turn returns and does (counters, quota, first writer wins,
        duplicates inside the batch included). One loop with the lookups hoisted: the kernel
        reports new flows by the tens of thousands a second, and a method call each costs more
        than the dictionary work."""
        records = self._records
        get = records.get
        room = self.max_records - len(records)
        winners: list[str] = []
        stored: list[bool] = []
        win, put = winners.append, stored.append
        conflicts = degraded = created = 0
        for key, backend, bucket in zip(keys, backends, buckets, strict=True):
            rec = get(key)
            if rec is not None:
                rec.last_seen_s = now
                if rec.backend != backend:
                    conflicts += 1
                if not replica:
                    rec.replica = False
                win(rec.backend)
                put(False)
            elif created >= room:
                degraded += 1
                win(backend)
                put(False)
            else:
                records[key] = FlowRecord(backend, bucket, now, now, replica)
                created += 1
                win(backend)
                put(True)
        c = self.counters
        c.conflicts += conflicts
        c.degraded += degraded
        if replica:
            c.replicas_stored += created
        else:
            c.stored += created
        return winners, stored

    def answer_query(self, key: RecordKey, bucket: int, fallback: str, now: float) -> QueryResult:
        """The owner's answer: its record, or else record and answer `fallback` (old table)."""
        self.counters.queries += 1
        existing = self.get(key, now)
        if existing is not None:
            self.counters.hits += 1
            return QueryResult(existing, found=True, stored=False, degraded=False)
        self.counters.misses += 1
        backend, stored = self.put_first(key, fallback, bucket, now)
        return QueryResult(backend, found=False, stored=stored, degraded=not stored)

    def expire_idle(self, now: float) -> int:
        """Remove records idle longer than `idle_timeout_s`; returns how many."""
        limit = now - self.idle_timeout_s
        gone = [k for k, r in self._records.items() if r.last_seen_s < limit]
        for k in gone:
            del self._records[k]
        self.counters.expired += len(gone)
        return len(gone)

    def expire_idle_by(self, timeout_s_of: Callable[[int], float], now: float) -> int:
        """Remove records idle longer than their listener's timeout (`timeout_s_of(listener id)`);
        returns how many. A record's idle timer is reset by every write, query and keep-alive."""
        gone = [k for k, r in self._records.items() if r.last_seen_s < now - timeout_s_of(k[0])]
        for k in gone:
            del self._records[k]
        self.counters.expired += len(gone)
        return len(gone)

    def drop_where(self, predicate: Callable[[RecordKey, FlowRecord], bool]) -> int:
        """Remove records matching `predicate` (e.g. a listener whose transition ended)."""
        gone = [k for k, r in self._records.items() if predicate(k, r)]
        for k in gone:
            del self._records[k]
        self.counters.dropped += len(gone)
        return len(gone)

    def drop_listener(self, listener_id: int) -> int:
        return self.drop_where(lambda k, _r: k[0] == listener_id)
