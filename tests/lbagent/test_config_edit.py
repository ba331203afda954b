"""Operator tools for a mux run without the portal: `lbagent validate` and the backend edits that
bump generations and write `previous` (lbagent.config_edit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbagent.cli import main as lbagent
from lbagent.config_edit import EditError, add_backend, drain_backend, remove_backend
from lbagent.state import parse_state
from tests.lbagent.test_state import example_document

NEW = {"address": "10.1.0.7", "port": 80, "weight": 1, "state": "active", "mac": None, "host": "web-3"}


def _listener(doc: dict) -> dict:
    return doc["vips"][0]["listeners"][0]


def test_each_edit_is_a_new_generation_with_previous_and_stays_valid():
    doc = example_document()
    before = _listener(doc)
    for new in (add_backend(doc, 12, NEW, now=1000.0),
                drain_backend(doc, 12, "10.1.0.5", None, now=1000.0),
                remove_backend(doc, 12, "10.1.0.5", 80, now=1000.0)):
        listener = _listener(new)
        assert new["generation"] == doc["generation"] + 1
        assert listener["generation"] == before["generation"] + 1
        assert listener["previous"] == {"generation": before["generation"], "backends": before["backends"],
                                        "drain_deadline": 1000.0 + before["drain_timeout_s"]}
        parse_state(new)  # what the daemon would accept
    assert before["generation"] == 5, "the input is not modified"
    assert [b["address"] for b in _listener(add_backend(doc, 12, NEW, 0.0))["backends"]] == [
        "10.1.0.5", "10.1.0.6", "10.1.0.7"]
    assert _listener(drain_backend(doc, 12, "10.1.0.5", None, 0.0))["backends"][0]["state"] == "draining"
    assert [b["address"] for b in _listener(remove_backend(doc, 12, "10.1.0.6", None, 0.0))["backends"]] == [
        "10.1.0.5"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: add_backend(d, 99, NEW, 0.0), "no listener with id 99"),
    (lambda d: add_backend(d, 12, {**NEW, "address": "10.1.0.5"}, 0.0), "already has backend 10.1.0.5:80"),
    (lambda d: drain_backend(d, 12, "10.9.9.9", None, 0.0), "has no backend 10.9.9.9"),
    (lambda d: drain_backend(d, 12, "10.1.0.6", None, 0.0), "already draining"),
    (lambda d: remove_backend(d, 12, "10.1.0.5", 81, 0.0), "has no backend 10.1.0.5:81"),
])
def test_impossible_edits_are_refused_naming_what_is_wrong(edit, message):
    with pytest.raises(EditError, match=message):
        edit(example_document())


def test_validate_command_exit_status_and_offending_field(tmp_path: Path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(example_document()))
    bad_doc = example_document()
    _listener(bad_doc)["backends"][0]["weight"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_doc))
    assert lbagent(["validate", str(good)]) == 0
    assert "ok: generation 17, node mux-a, 1 VIP(s), 1 listener(s)" in capsys.readouterr().out
    assert lbagent(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.json: refused: vips[0].listeners[0].backends[0].weight" in err


def test_state_command_edits_every_file_with_one_deadline_or_none(tmp_path: Path, capsys):
    files = []
    for node in ("mux-a", "mux-b"):
        doc = example_document()
        doc["node"] = node
        path = tmp_path / f"{node}.json"
        path.write_text(json.dumps(doc))
        files.append(path)
    assert lbagent(["state", "add-backend", *map(str, files), "--listener", "12",
                    "--address", "10.1.0.7"]) == 0
    docs = [json.loads(f.read_text()) for f in files]
    deadlines = {_listener(d)["previous"]["drain_deadline"] for d in docs}
    assert len(deadlines) == 1, "every mux must drain until the same deadline"
    assert all(_listener(d)["generation"] == 6 and d["generation"] == 18 for d in docs)
    assert [b["address"] for b in _listener(docs[0])["backends"]][-1] == "10.1.0.7"
    capsys.readouterr()
    # refused on one file: no file changes
    docs[1]["vips"][0]["listeners"][0]["backends"].pop()
    files[1].write_text(json.dumps(docs[1]))
    snapshot = [f.read_text() for f in files]
    assert lbagent(["state", "remove-backend", *map(str, files), "--listener", "12",
                    "--address", "10.1.0.7"]) == 1
    assert "has no backend 10.1.0.7" in capsys.readouterr().err
    assert [f.read_text() for f in files] == snapshot
