"""The daemon's state kept across restarts (lbagent.state_files), one file per VIP and per
listener: it reads back as saved, a save after one change writes that one object's file only,
what went is removed, a damaged file costs its own VIP only, and the single files of earlier
versions are read once and replaced. Plain files in a temporary directory: no root needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from lbagent.core.transition import GenerationTable, ListenerTables, OldTable
from lbagent.state import StateParser, Vip
from lbagent.state_files import HistoryFiles, LastGoodFiles
from tests.lbagent.documents import one_mux_document

ADDRESSES = ["203.0.113.1", "203.0.113.2", "2001:db8::10", "203.0.113.4"]


def _backend(v: int, b: int) -> dict:
    address = f"2001:db8:1::{b + 1}" if ":" in ADDRESSES[v] else f"10.1.{v}.{b + 1}"
    return {"address": address, "port": 80}


def _document(generation: int, vips: int = 4) -> dict:
    return one_mux_document(generation, [
        {"address": address, "listeners": [
            {"id": v + 1, "protocol": "tcp", "port": 80, "generation": 1,
             "backends": [_backend(v, b) for b in range(3)]}]}
        for v, address in enumerate(ADDRESSES[:vips])])


def _vips(parser: StateParser, document: dict) -> dict[str, Vip]:
    return {vip.address: vip for vip in parser.parse(document).vips}


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_last_good_reads_back_and_a_change_writes_only_that_vip(tmp_path: Path) -> None:
    parser = StateParser()
    first = _vips(parser, _document(1))
    files = LastGoodFiles(tmp_path)
    assert files.save(first) == 4
    assert sorted(p.name for p in files.directory.iterdir()) == sorted(f"{a}.json" for a in first)
    assert LastGoodFiles(tmp_path).load() == first  # a restarted daemon reads what was saved

    changed = copy.deepcopy(_document(2))
    changed["vips"][1]["listeners"][0]["backends"][0]["port"] = 8080
    second = _vips(parser, changed)
    assert files.save(second) == 1  # the parser kept the other VIPs' objects: not written again
    assert files.save(second) == 0
    assert LastGoodFiles(tmp_path).load() == second

    del second["203.0.113.4"]
    assert files.save(second) == 0
    assert not (files.directory / "203.0.113.4.json").exists()
    assert LastGoodFiles(tmp_path).load() == second


def test_a_first_save_removes_what_an_earlier_process_left(tmp_path: Path) -> None:
    parser = StateParser()
    LastGoodFiles(tmp_path).save(_vips(parser, _document(1)))
    fewer = _vips(StateParser(), _document(1, vips=2))
    LastGoodFiles(tmp_path).save(fewer)  # a new process, whose VIPs are fewer
    assert LastGoodFiles(tmp_path).load() == fewer


def test_a_damaged_file_costs_its_own_vip_only_and_is_named(tmp_path: Path, caplog) -> None:
    vips = _vips(StateParser(), _document(1))
    files = LastGoodFiles(tmp_path)
    files.save(vips)
    (files.directory / "203.0.113.2.json").write_text('{"version": 1, "vip": {"addr')  # torn
    moved = json.loads((files.directory / "203.0.113.1.json").read_text())
    (files.directory / "203.0.113.4.json").write_text(json.dumps(moved))  # another VIP's content
    loaded = LastGoodFiles(tmp_path).load()
    assert loaded == {a: v for a, v in vips.items() if a in ("203.0.113.1", "2001:db8::10")}
    assert "203.0.113.2.json: <document>: not valid JSON" in caplog.text
    assert "203.0.113.4.json: vip.address: '203.0.113.1' in the file of VIP '203.0.113.4'" in caplog.text


def test_the_single_file_of_earlier_versions_is_read_then_replaced(tmp_path: Path) -> None:
    vips = _vips(StateParser(), _document(1))
    legacy = {"version": 1, "vips": [v.to_dict() for v in vips.values()]}
    (tmp_path / "last-good.json").write_text(json.dumps(legacy))
    files = LastGoodFiles(tmp_path)
    assert files.load() == vips
    files.save(vips)
    assert not (tmp_path / "last-good.json").exists()
    assert LastGoodFiles(tmp_path).load() == vips


def test_a_failed_save_is_retried_for_what_was_not_written(tmp_path: Path) -> None:
    vips = _vips(StateParser(), _document(1))
    files = LastGoodFiles(tmp_path)
    files.directory.mkdir()
    (files.directory / "2001:db8::10.json").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        files.save(vips)
    (files.directory / "2001:db8::10.json").rmdir()
    written_before = len(files.saved or {})
    assert files.save(vips) == len(vips) - written_before
    assert LastGoodFiles(tmp_path).load() == vips


def _table(generation: int, backends: tuple[str, ...], seed: int) -> GenerationTable:
    table = np.random.default_rng(seed).integers(0, len(backends), 251).astype(np.int32)
    table.setflags(write=False)
    return GenerationTable(generation, backends, table)


def _same(a: ListenerTables, b: ListenerTables) -> bool:
    def gen(x: GenerationTable, y: GenerationTable) -> bool:
        return (x.generation, x.backends) == (y.generation, y.backends) and np.array_equal(x.table, y.table)
    return gen(a.current, b.current) and len(a.old) == len(b.old) and all(
        gen(o.table, p.table) and o.drain_deadline == p.drain_deadline
        for o, p in zip(a.old, b.old, strict=True))


def test_history_reads_back_changes_write_one_file_and_ended_tables_are_dropped(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    ab, abc = ("10.0.0.1:80", "10.0.0.2:80"), ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    tables = {
        7: ListenerTables(current=_table(2, abc, 1), old=(OldTable(_table(1, ab, 2), now + 30),)),
        8: ListenerTables(current=_table(1, ab, 3), old=()),
    }
    files = HistoryFiles(tmp_path)
    assert files.save(tables) == 2
    loaded = HistoryFiles(tmp_path).load(now)
    assert set(loaded) == {7, 8}
    assert all(_same(loaded[lid], tables[lid]) for lid in tables)
    # Once the old table's drain deadline has passed, a restarted daemon does not bring it back.
    assert HistoryFiles(tmp_path).load(now + 31)[7].old == ()

    before = _mtimes(files.directory)
    moved = ListenerTables(current=_table(2, abc, 4), old=(OldTable(tables[8].current, now + 30),))
    tables = {**tables, 8: moved}
    assert files.save(tables) == 1
    after = _mtimes(files.directory)
    assert after["l7.json"] == before["l7.json"]  # listener 7 was not written again
    assert all(after[n] == before[n] for n in before if n.startswith("l7_"))

    del tables[7]
    assert files.save(tables) == 0
    assert not [n for n in _mtimes(files.directory) if n.startswith("l7")]  # its JSON and tables went
    assert set(HistoryFiles(tmp_path).load(now)) == {8}


def test_history_of_earlier_versions_is_read_then_replaced(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    files = HistoryFiles(tmp_path)
    tables = {5: ListenerTables(current=_table(3, ("10.0.0.1:80",), 5), old=())}
    files.save(tables)
    entry = json.loads((files.directory / "l5.json").read_text())
    (files.directory / "l5.json").unlink()
    (files.directory / "history.json").write_text(json.dumps({"5": entry}))
    restarted = HistoryFiles(tmp_path)
    assert _same(restarted.load(now)[5], tables[5])
    restarted.save(tables)
    assert not (files.directory / "history.json").exists()
    assert _same(HistoryFiles(tmp_path).load(now)[5], tables[5])
