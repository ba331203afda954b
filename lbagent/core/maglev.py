"""Maglev lookup tables: every mux builds the same bucket -> backend table from the same input.

Algorithm (Eisenbud et al., "Maglev", NSDI 2016, section 3.4), with weights:

* Each backend name gets a preference list over the M buckets, a permutation
  ``pref_i(j) = (offset_i + j * skip_i) mod M`` with ``offset_i = h1(name) mod M`` and
  ``skip_i = h2(name) mod (M - 1) + 1``. M is prime, so every skip generates a full permutation.
  h1/h2 are BLAKE2b digests of the UTF-8 name (keyed by purpose and `seed`), never Python's
  ``hash()``, so the table is identical in every process whatever PYTHONHASHSEED says.
* Backends take turns, in input order, each claiming its most preferred bucket still free, until
  all M buckets are claimed. Weights: the heaviest backend takes a turn every round, a backend of
  weight w takes one in round r exactly when ``floor((r+1) w / w_max) > floor(r w / w_max)``
  (integer credit), so shares are proportional to weight. Weight 0 takes no buckets.

Speed: the population loop is inherently sequential (every claim depends on all earlier ones).
`maglev_table` runs it compiled with numba when numba is importable (`maglev_table_numba`: the
paper's loop as is, about 1-3 ms for M = 65537), and otherwise falls back to the pure
Python/numpy builder (`maglev_table_numpy`, tens of ms): the naive loop walks each backend's list
past already claimed buckets, and most of that walking happens when the table is nearly full, so
it runs the cheap early part as the plain loop and finishes the last few percent of the buckets
with numpy: for every backend, the still-free buckets are ranked by their position in its
permutation (position of bucket e for backend i is ``(e - offset_i) * skip_i^-1 mod M``), and the
remaining turns pick from those short ranked lists. All builders produce exactly the naive
algorithm's bytes (tests compare them with each other and with `maglev_table_reference`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "MAX_WEIGHT",
    "backend_permutation_params",
    "is_prime",
    "maglev_table",
    "maglev_table_numba",
    "maglev_table_numpy",
    "maglev_table_reference",
    "moved_share",
    "numba_kernel",
    "table_shares",
]

DEFAULT_TABLE_SIZE = 65537
MAX_WEIGHT = 1_000_000
# Switch to the ranked-free-bucket finish when this share of the table is still free.
_TAIL_FRACTION = 0.05
_TAIL_MATRIX_CELLS = 200_000

log = logging.getLogger(__name__)


def is_prime(n: int) -> bool:
    """Deterministic primality for table sizes (trial division; M is at most a few million)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _digest64(name: str, purpose: bytes, seed: int) -> int:
    key = purpose + seed.to_bytes(8, "big", signed=False)
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8, key=key).digest(), "big")


def backend_permutation_params(name: str, table_size: int, seed: int = 0) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list."""
    offset = _digest64(name, b"maglev-offset", seed) % table_size
    skip = _digest64(name, b"maglev-skip", seed) % (table_size - 1) + 1
    return offset, skip


def _all_permutation_params(names: list[str], table_size: int, seed: int) -> tuple[list[int], list[int]]:
    """`backend_permutation_params` for every name, about 2x faster at N=1000: the keyed BLAKE2b
    state is set up once per purpose and copied per name (same digests, tests compare)."""
    seed_bytes = seed.to_bytes(8, "big", signed=False)
    h_offset = hashlib.blake2b(digest_size=8, key=b"maglev-offset" + seed_bytes)
    h_skip = hashlib.blake2b(digest_size=8, key=b"maglev-skip" + seed_bytes)
    from_bytes = int.from_bytes
    offsets: list[int] = []
    skips: list[int] = []
    for name in names:
        data = name.encode("utf-8")
        h = h_offset.copy()
        h.update(data)
        offsets.append(from_bytes(h.digest(), "big") % table_size)
        h = h_skip.copy()
        h.update(data)
        skips.append(from_bytes(h.digest(), "big") % (table_size - 1) + 1)
    return offsets, skips


def _validate(
    names: Sequence[str], weights: Sequence[int] | None, table_size: int, seed: int
) -> tuple[list[str], list[int]]:
    if isinstance(names, str):
        raise TypeError("names: expected a sequence of backend names, got a single string")
    names_list = list(names)
    if not names_list:
        raise ValueError("names: need at least one backend")
    for name in names_list:
        if not isinstance(name, str) or not name:
            raise ValueError(f"names: every backend name must be a non-empty string, got {name!r}")
    if len(set(names_list)) != len(names_list):
        dupes = sorted({n for n in names_list if names_list.count(n) > 1})
        raise ValueError(f"names: backend names must be unique, duplicated: {dupes}")
    if not isinstance(table_size, int) or isinstance(table_size, bool):
        raise TypeError(f"table_size: expected an int, got {type(table_size).__name__}")
    if not is_prime(table_size):
        raise ValueError(f"table_size: {table_size} is not prime (Maglev needs a prime, e.g. 65537)")
    if table_size <= len(names_list):
        raise ValueError(f"table_size: {table_size} must be larger than the number of backends "
                         f"({len(names_list)})")
    if table_size >= 2**31:
        raise ValueError(f"table_size: {table_size} is too large (max 2**31-1)")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: {seed!r} must be an integer in 0..2**64-1")
    if weights is None:
        weights_list = [1] * len(names_list)
    else:
        weights_list = list(weights)
        if len(weights_list) != len(names_list):
            raise ValueError(f"weights: {len(weights_list)} weights for {len(names_list)} backends")
        for w in weights_list:
            if not isinstance(w, int | np.integer) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
                raise ValueError(f"weights: every weight must be an integer in 0..{MAX_WEIGHT}, got {w!r}")
        weights_list = [int(w) for w in weights_list]
        if max(weights_list) == 0:
            raise ValueError("weights: at least one backend needs a positive weight")
    return names_list, weights_list


def _turn_sequence(weights: list[int], count: int) -> list[int]:
    """The backend index of each of the first `count` turns.

    Round r gives a turn to backend i (in input order) when
    ``floor((r+1) w_i / w_max) > floor(r w_i / w_max)``. Every turn claims one bucket, so a table
    of M buckets needs exactly M turns.
    """
    n = len(weights)
    if len(set(weights)) == 1:
        return (np.arange(count, dtype=np.int64) % n).tolist()
    w = np.array(weights, dtype=np.int64)
    w_max = int(w.max())
    per_period = int(w.sum())  # turns in w_max rounds
    out: list[np.ndarray] = []
    got = 0
    r0 = 0
    chunk_rounds = max(1, min(w_max, 2_000_000 // n))
    while got < count:
        r = np.arange(r0, r0 + chunk_rounds, dtype=np.int64)[:, None] % w_max
        takes = ((r + 1) * w) // w_max > (r * w) // w_max
        idx = np.nonzero(takes)[1]  # row-major: round by round, backends in input order
        out.append(idx)
        got += len(idx)
        r0 += chunk_rounds
        if r0 > w_max * (count // max(per_period, 1) + 2):
            break
    return np.concatenate(out)[:count].tolist()


def maglev_table(
    names: Sequence[str],
    weights: Sequence[int] | None = None,
    table_size: int = DEFAULT_TABLE_SIZE,
    *,
    seed: int = 0,
) -> np.ndarray:
    """The Maglev table: an int32 array of `table_size` indexes into `names`, one per bucket.

    Same ordered (names, weights, table_size, seed) -> same bytes, in any process, with or without
    numba. `seed` makes independent tables over the same names (the ownership table uses one).
    Uses the numba-compiled loop when numba is importable, else the pure Python/numpy builder.
    """
    names_list, weights_list = _validate(names, weights, table_size, seed)
    kernel = numba_kernel()
    if kernel is None:
        return _build_numpy(names_list, weights_list, table_size, seed)
    return _build_numba(kernel, names_list, weights_list, table_size, seed)


# --- numba builder -----------------------------------------------------------------------------

def _populate(offsets: np.ndarray, skips: np.ndarray, weights: np.ndarray, entry: np.ndarray) -> None:
    """The paper's population loop, with weights, filling `entry` (int32, all M buckets) in place.

    Plain Python on purpose: `numba_kernel` compiles it; it is not called uncompiled (far too slow
    in CPython, the numpy builder is the fallback). Weighted turns use an integer credit per
    backend instead of the ``floor((r+1) w / w_max) > floor(r w / w_max)`` test: with
    ``credit = r*w mod w_max`` the test holds exactly when ``credit + w >= w_max`` (w <= w_max, so
    one subtraction keeps the credit reduced), and r wrapping at w_max leaves ``r*w mod w_max``
    unchanged, so the turn order is identical to `_turn_sequence` and the reference, without a
    division per turn.
    """
    m = entry.shape[0]
    n = offsets.shape[0]
    w_max = weights.max()
    pos = offsets.copy()  # each backend's next candidate bucket
    credit = np.zeros(n, dtype=np.int64)
    for b in range(m):
        entry[b] = -1
    filled = 0
    while True:  # one round: backends in input order
        for i in range(n):
            c_i = credit[i] + weights[i]
            if c_i < w_max:
                credit[i] = c_i
                continue
            credit[i] = c_i - w_max
            c = pos[i]
            skip = skips[i]
            while entry[c] >= 0:
                c += skip
                if c >= m:
                    c -= m
            entry[c] = i
            filled += 1
            if filled == m:
                return
            c += skip
            if c >= m:
                c -= m
            pos[i] = c


_KERNEL_SIGNATURE = "void(int64[::1], int64[::1], int64[::1], int32[::1])"
_kernel_lock = threading.Lock()
_kernel: Callable[..., None] | None = None
_kernel_loaded = False


def numba_kernel() -> Callable[..., None] | None:
    """The compiled `_populate`, or None when numba is not importable (then `maglev_table` uses
    the numpy builder). numba is imported here, on the first table build, never at module import:
    importing lbagent.core.maglev stays cheap for code that never builds a table.

    ``cache=True``: the compiled machine code is written next to this module (``__pycache__``,
    or numba's user-wide cache dir when that is not writable; ``NUMBA_CACHE_DIR`` overrides) and
    loaded by later processes, so the daemon pays the LLVM compile (about a second) once per
    machine and numba version, not on every start; a later start only loads the cached code
    (tens of ms, measured in bench/maglev.py). The explicit signature pins one specialisation, so
    the cache never grows per argument type.
    """
    global _kernel, _kernel_loaded
    if _kernel_loaded:
        return _kernel
    with _kernel_lock:
        if not _kernel_loaded:
            try:
                import numba
            except Exception as exc:  # ImportError, or numba refusing this numpy/Python version
                log.info("numba not available (%s): Maglev tables use the numpy builder", exc)
                _kernel = None
            else:
                try:
                    _kernel = numba.njit(_KERNEL_SIGNATURE, cache=True, nogil=True)(_populate)
                except RuntimeError as exc:  # "cannot cache function ...: no locator available"
                    log.warning("numba cannot cache the Maglev kernel (%s): compiling per process", exc)
                    _kernel = numba.njit(_KERNEL_SIGNATURE, nogil=True)(_populate)
            _kernel_loaded = True
    return _kernel


def _build_numba(
    kernel: Callable[..., None], names_list: list[str], weights_list: list[int], m: int, seed: int
) -> np.ndarray:
    offsets, skips = _all_permutation_params(names_list, m, seed)
    table = np.empty(m, dtype=np.int32)
    kernel(np.array(offsets, dtype=np.int64), np.array(skips, dtype=np.int64),
           np.array(weights_list, dtype=np.int64), table)
    return table


def maglev_table_numba(
    names: Sequence[str],
    weights: Sequence[int] | None = None,
    table_size: int = DEFAULT_TABLE_SIZE,
    *,
    seed: int = 0,
) -> np.ndarray:
    """`maglev_table` forced onto the numba builder; ImportError when numba is not importable."""
    names_list, weights_list = _validate(names, weights, table_size, seed)
    kernel = numba_kernel()
    if kernel is None:
        raise ImportError("numba is not importable: use maglev_table (numpy fallback)")
    return _build_numba(kernel, names_list, weights_list, table_size, seed)


# --- pure Python/numpy builder (fallback without numba) ----------------------------------------

def maglev_table_numpy(
    names: Sequence[str],
    weights: Sequence[int] | None = None,
    table_size: int = DEFAULT_TABLE_SIZE,
    *,
    seed: int = 0,
) -> np.ndarray:
    """`maglev_table` forced onto the pure Python/numpy builder (the fallback without numba)."""
    names_list, weights_list = _validate(names, weights, table_size, seed)
    return _build_numpy(names_list, weights_list, table_size, seed)


def _build_numpy(names_list: list[str], weights_list: list[int], m: int, seed: int) -> np.ndarray:
    offsets, skips = _all_permutation_params(names_list, m, seed)

    turns = _turn_sequence(weights_list, m)
    n_active = sum(1 for w in weights_list if w > 0)
    # The ranked finish holds an (active backends x free buckets) matrix: bound its size.
    tail_free = max(1, min(int(m * _TAIL_FRACTION), _TAIL_MATRIX_CELLS // n_active))

    entry = [-1] * m
    pos = list(offsets)  # each backend's current place in its permutation (a bucket number)
    tail_start = m - tail_free
    # Plain Maglev loop while free buckets are plentiful (few skips per claim).
    for filled in range(tail_start):
        i = turns[filled]
        c = pos[i]
        skip = skips[i]
        while entry[c] >= 0:
            c += skip
            if c >= m:
                c -= m
        entry[c] = i
        c += skip
        pos[i] = c - m if c >= m else c

    table = np.array(entry, dtype=np.int32)
    _finish_with_ranked_free(table, turns[tail_start:], offsets, skips, m)
    return table


def _finish_with_ranked_free(
    table: np.ndarray, turns: list[int], offsets: list[int], skips: list[int], m: int
) -> None:
    """Fill the remaining free buckets exactly as the plain loop would, in place.

    Every bucket a backend skipped so far is claimed (claims are never undone), so its next
    claim is the free bucket earliest in its permutation: rank free buckets per backend once.
    `turns` are the remaining turns, one per free bucket.
    """
    free = np.flatnonzero(table < 0).astype(np.int64)
    if len(free) == 0:
        return
    active = sorted(set(turns))
    off = np.array([offsets[i] for i in active], dtype=np.int64)[:, None]
    inv = np.array([pow(skips[i], -1, m) for i in active], dtype=np.int64)[:, None]
    positions = ((free[None, :] - off) % m) * inv % m  # where each free bucket sits in each list
    ranked = free[np.argsort(positions, axis=1)]  # row k: active[k]'s free buckets, best first
    ranked_lists = {i: ranked[k].tolist() for k, i in enumerate(active)}
    cursor = dict.fromkeys(active, 0)
    taken = bytearray((table >= 0).tobytes())
    for i in turns:
        lst = ranked_lists[i]
        k = cursor[i]
        b = lst[k]
        while taken[b]:
            k += 1
            b = lst[k]
        taken[b] = 1
        table[b] = i
        cursor[i] = k + 1


def maglev_table_reference(
    names: Sequence[str],
    weights: Sequence[int] | None = None,
    table_size: int = DEFAULT_TABLE_SIZE,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Straightforward transcription of the paper's pseudocode (full permutation table, one
    claim per turn), for tests and as the benchmark's baseline. Same output as `maglev_table`."""
    names_list, weights_list = _validate(names, weights, table_size, seed)
    m = table_size
    n = len(names_list)
    permutation = []
    for name in names_list:
        offset, skip = backend_permutation_params(name, m, seed)
        permutation.append([(offset + j * skip) % m for j in range(m)])
    w_max = max(weights_list)
    next_idx = [0] * n
    entry = [-1] * m
    filled = 0
    r = 0
    while True:
        for i in range(n):
            w = weights_list[i]
            if ((r + 1) * w) // w_max <= (r * w) // w_max:
                continue
            c = permutation[i][next_idx[i]]
            while entry[c] >= 0:
                next_idx[i] += 1
                c = permutation[i][next_idx[i]]
            entry[c] = i
            next_idx[i] += 1
            filled += 1
            if filled == m:
                return np.array(entry, dtype=np.int32)
        r = (r + 1) % w_max


def table_shares(table: np.ndarray, n_backends: int) -> np.ndarray:
    """Share of buckets (0..1) each backend index holds."""
    counts = np.bincount(np.asarray(table, dtype=np.int64), minlength=n_backends)
    return counts / float(len(table))


def moved_share(old_names: Sequence[str], old_table: np.ndarray,
                new_names: Sequence[str], new_table: np.ndarray) -> float:
    """Share of buckets whose backend (by name) differs between two tables of the same size."""
    if len(old_table) != len(new_table):
        raise ValueError(f"tables differ in size: {len(old_table)} vs {len(new_table)}")
    old_ids = np.asarray(list(old_names), dtype=object)[old_table]
    new_ids = np.asarray(list(new_names), dtype=object)[new_table]
    return float(np.mean(old_ids != new_ids))
