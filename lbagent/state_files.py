"""What the mux daemon keeps on disk across its restarts, one file per object, so that saving
after an apply costs what the apply changed, not the number of VIPs on the mux.

* `<run-dir>/last-good/<VIP address>.json`: what each VIP last ran in the kernel. A restart whose
  document is refused for a VIP keeps serving that VIP's last good state. Each file is replaced
  atomically and fsynced; a damaged file costs its own VIP only.
* `<run-dir>/history/l<listener id>.json` plus one `.npy` per table it names: every live table
  of each listener in transition (current and old, with their drain deadlines), so a restarted
  daemon keeps the flows of every live old table, not only of the one generation the desired
  state carries as `previous`.

At 1,000 VIPs (4,000 listeners) the single files these replace were 3 MB and 1 MB, rewritten
after every change on every mux (about 35 ms of CPU per apply, docs/bench-push.md). The single
files of earlier versions (`last-good.json`, `history/history.json`) are still read at start
when no per-object file exists, and removed by the first save.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lbagent.core.transition import GenerationTable, ListenerTables, OldTable
from lbagent.state import (
    StateError,
    Vip,
    dump_last_good_vip,
    fsync_directory,
    parse_last_good,
    parse_last_good_vip,
    write_file_atomically,
)

log = logging.getLogger("lbagent.state_files")

# More files than this in one save (a first apply, a restart): each file is still fsynced, but
# their directory once at the end instead of once per file.
_BULK_FILES = 32


class LastGoodFiles:
    """VIP address -> its last good state, one file per VIP."""

    def __init__(self, run_dir: Path) -> None:
        self.directory = run_dir / "last-good"
        self.legacy = run_dir / "last-good.json"
        self.saved: dict[str, Vip] | None = None  # what the files hold (None: not known yet)

    def load(self) -> dict[str, Vip]:
        """Every readable VIP file (a damaged one is logged by name and skipped: its VIP alone
        has no last good state), or the legacy single file when there is no directory."""
        vips: dict[str, Vip] = {}
        if not self.directory.is_dir():
            if self.legacy.exists():
                try:
                    vips = parse_last_good(self.legacy.read_bytes())
                except (OSError, StateError) as exc:
                    log.error("ignoring %s: %s (a VIP whose desired state is refused will not be served)",
                              self.legacy, exc)
            return vips
        for path in sorted(self.directory.glob("*.json")):
            try:
                vip = parse_last_good_vip(path.read_bytes())
                if vip.address != path.stem:
                    raise StateError("vip.address", f"{vip.address!r} in the file of VIP {path.stem!r}")
            except (OSError, StateError) as exc:
                log.error("ignoring %s: %s (if this VIP's desired state is refused it will not be served)",
                          path, exc)
                continue
            vips[vip.address] = vip
        self.saved = dict(vips)
        return vips

    def save(self, vips: Mapping[str, Vip]) -> int:
        """Write the VIPs that are not the objects last written, remove the files of VIPs that
        went; returns the number of files written. On OSError (a full disk) what was written
        before it stays recorded, so the next save writes only the rest."""
        if self.saved is None:  # the first save of this process: whatever an earlier one left
            self.directory.mkdir(parents=True, exist_ok=True)
            self.legacy.unlink(missing_ok=True)  # what it held is read; the directory replaces it
            self.saved = {}
            gone = [p.stem for p in self.directory.glob("*.json") if p.stem not in vips]
        else:
            gone = [address for address in self.saved if address not in vips]
        saved = self.saved  # updated file by file: after an OSError it says what the files hold
        changed = [(a, v) for a, v in vips.items() if saved.get(a) is not v]
        if not changed and not gone:
            return 0
        bulk = len(changed) > _BULK_FILES
        for address, vip in changed:
            path = self.directory / f"{address}.json"
            write_file_atomically(path, dump_last_good_vip(vip), durable=True, sync_directory=not bulk)
            saved[address] = vip
        for address in gone:
            (self.directory / f"{address}.json").unlink(missing_ok=True)
            saved.pop(address, None)
        if gone or bulk:
            fsync_directory(self.directory)
        return len(changed)


class HistoryFiles:
    """Listener id -> its live tables, one JSON file per listener and one .npy per table."""

    def __init__(self, run_dir: Path) -> None:
        self.directory = run_dir / "history"
        self.legacy = self.directory / "history.json"
        self._saved: dict[int, tuple[ListenerTables, dict]] | None = None  # listener -> (tables, entry)

    def load(self, now: float) -> dict[int, ListenerTables]:
        """The saved tables, old tables whose drain deadline passed left out; an unreadable
        listener file is logged and skipped (that listener starts from its desired state)."""
        entries: dict[int, dict] = {}
        if self.legacy.exists():
            try:
                entries.update({int(lid): e for lid, e in json.loads(self.legacy.read_text()).items()})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.info("no usable transition history in %s (%s)", self.legacy, exc)
        for path in self.directory.glob("l*.json"):
            try:
                entries[int(path.stem[1:])] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.info("no usable transition history in %s (%s): that listener starts from its desired "
                         "state", path, exc)
        tables: dict[int, ListenerTables] = {}
        for lid, entry in entries.items():
            try:
                old = tuple(OldTable(self._table(e), e["deadline"])
                            for e in entry["old"] if e["deadline"] > now)
                tables[lid] = ListenerTables(current=self._table(entry["current"]), old=old)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.info("no usable transition history for listener %d (%s): it starts from its desired "
                         "state", lid, exc)
        return tables

    def _table(self, entry: dict) -> GenerationTable:
        table = np.load(self.directory / entry["file"])
        table.setflags(write=False)
        return GenerationTable(entry["generation"], tuple(entry["backends"]), table)

    def save(self, tables: Mapping[int, ListenerTables]) -> int:
        """Write the files of listeners whose tables are not the objects last written, remove
        those of listeners that went and the tables no entry names any more; returns the number
        of listener files written."""
        saved = self._saved
        first = saved is None
        if saved is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            saved = {}
        current: dict[int, tuple[ListenerTables, dict]] = {}
        written = 0
        for lid, listener_tables in tables.items():
            held = saved.get(lid)
            if held is not None and held[0] is listener_tables:
                current[lid] = held
                continue
            entries = []
            for g, deadline in [(listener_tables.current, None),
                                *((o.table, o.drain_deadline) for o in listener_tables.old)]:
                digest = hashlib.sha256("\0".join(g.backends).encode()).hexdigest()[:12]
                name = f"l{lid}_g{g.generation}_{digest}.npy"
                if not (self.directory / name).exists():
                    np.save(self.directory / name, np.asarray(g.table))
                entries.append({"generation": g.generation, "backends": list(g.backends),
                                "deadline": deadline, "file": name})
            entry = {"current": entries[0], "old": entries[1:]}
            write_file_atomically(self.directory / f"l{lid}.json", json.dumps(entry))
            current[lid] = (listener_tables, entry)
            written += 1
        if not first and not written and len(current) == len(saved):
            return 0  # nothing changed, nothing went
        if first:  # whatever an earlier process left: files no entry names
            keep = {e["file"] for _, d in current.values() for e in [d["current"], *d["old"]]}
            keep |= {f"l{lid}.json" for lid in current}
            for path in [*self.directory.glob("*.npy"), *self.directory.glob("l*.json")]:
                if path.name not in keep:
                    path.unlink(missing_ok=True)
            self.legacy.unlink(missing_ok=True)
        else:  # only the files of listeners that changed or went
            for lid, (listener_tables, before) in saved.items():
                after = current.get(lid)
                if after is not None and after[0] is listener_tables:
                    continue
                keep = {e["file"] for e in [after[1]["current"], *after[1]["old"]]} if after else set()
                for e in [before["current"], *before["old"]]:
                    if e["file"] not in keep:
                        (self.directory / e["file"]).unlink(missing_ok=True)
                if after is None:
                    (self.directory / f"l{lid}.json").unlink(missing_ok=True)
        self._saved = current
        return written
