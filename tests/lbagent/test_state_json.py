"""The state the portal-mode daemon's bridge writes to the config file (fail static across a
restart) reads back as the state it applied, and after a change only the changed VIP is
serialised again."""

from __future__ import annotations

import copy
import json

from lbagent.state import StateParser, parse_state, state_json
from tests.lbagent.documents import one_mux_document


def _document(generation: int, vips: int = 5) -> dict:
    return one_mux_document(generation, [
        {"address": f"203.0.113.{v + 1}", "listeners": [
            {"id": v + 1, "protocol": "tcp", "port": 80, "generation": 1,
             "backends": [{"address": f"10.1.{v}.{b + 1}", "port": 80} for b in range(3)]}]}
        for v in range(vips)])


def test_the_written_state_reads_back_as_the_applied_one_and_only_changed_vips_are_serialised():
    parser = StateParser()
    first = parser.parse(_document(1))
    texts: dict = {}
    written = state_json(first, texts)
    assert json.loads(written) == json.loads(json.dumps(first.to_dict()))
    assert parse_state(written) == first

    changed = copy.deepcopy(_document(2))
    changed["vips"][3]["listeners"][0]["backends"][0]["port"] = 8080
    second = parser.parse(changed)
    before = dict(texts)
    written = state_json(second, texts)
    assert parse_state(written) == second
    # The unchanged VIPs kept their parsed objects, so their JSON was not made again.
    kept = [texts[v.address][1] is before[v.address][1] for v in second.vips]
    assert kept == [True, True, True, False, True]

    # A VIP that went is dropped from the kept texts.
    gone = _document(3)
    del gone["vips"][0]
    third = parser.parse(gone)
    assert parse_state(state_json(third, texts)) == third
    assert set(texts) == {v.address for v in third.vips}

