"""What the mux daemon tells its kernel driver along with the plans (no kernel, no root): the
plans it made anew and the listeners that went. The driver trusts a hint whose counts add up and
then skips every plan not named, so the daemon must name every plan that is not the very object
of its last apply (tests/lbagent/test_shared_sets.py shows the driver ends the same either way)."""

from __future__ import annotations

import copy
from pathlib import Path

from lbagent.daemon import DaemonOptions, MuxDaemon
from tests.lbagent.documents import one_mux_document


class RecordingDriver:
    """Records what the daemon passes to the driver: the hints themselves are what this test
    checks. The daemon with the real nftables driver, and the kernel holding the change it hinted:
    tests/lab/test_incremental.py::test_the_daemon_plans_and_writes_only_the_vip_a_change_touches."""

    last_changed_listeners = 0

    def __init__(self) -> None:
        self.calls: list[tuple[list, list | None, set | None]] = []

    def apply(self, plans, *, changed=None, removed=None) -> None:
        self.calls.append((list(plans), changed, set(removed) if removed is not None else None))


def _document(generation: int, vips: range, *, drained: int | None = None) -> dict:
    out = []
    for v in vips:
        listeners = []
        for port in (80, 443):
            lid = v * 10 + (port == 443)
            backends = [{"address": f"10.1.{v}.{b + 1}", "port": port,
                         "mac": f"02:00:00:00:{v:02x}:{b + 1:02x}"} for b in range(3)]
            listener = {"id": lid, "protocol": "tcp", "port": port, "generation": 1, "backends": backends}
            if lid == drained:
                listener.update(generation=2, previous={"generation": 1, "backends": copy.deepcopy(backends),
                                                        "drain_deadline": 4_000_000_000.0})
                backends[2]["state"] = "draining"
            listeners.append(listener)
        out.append({"address": f"203.0.113.{v}", "listeners": listeners})
    return one_mux_document(generation, out)


def test_the_daemon_names_every_plan_it_made_anew_and_every_listener_that_went(tmp_path: Path) -> None:
    daemon = MuxDaemon(DaemonOptions(config=tmp_path / "state.json", run_dir=tmp_path))
    driver = RecordingDriver()
    daemon.dataplane = driver  # type: ignore[assignment]
    documents = [
        _document(1, range(1, 7)),
        _document(2, range(1, 7), drained=30),  # one listener drains a backend
        _document(3, range(2, 8), drained=30),  # VIP 1 goes, VIP 7 comes
        _document(4, range(2, 8), drained=30),  # a new document number, nothing changed
        _document(5, range(2, 8)),  # the drain is called off
    ]
    for document in documents:
        daemon.state = daemon._parser.parse(document)
        daemon.apply()
    for (before, _, _), (plans, changed, removed) in zip(driver.calls, driver.calls[1:], strict=False):
        named = {id(p) for p in changed}
        previous = {p.listener_id: p for p in before}
        unnamed_new = [p.listener_id for p in plans
                       if id(p) not in named and previous.get(p.listener_id) is not p]
        assert unnamed_new == [], f"plans made anew but not named: {unnamed_new}"
        assert removed == previous.keys() - {p.listener_id for p in plans}
    # What each apply named: the first change only the drained listener's VIP, then VIPs 1 and 7.
    assert sorted(p.listener_id for p in driver.calls[1][1]) == [30, 31]
    assert driver.calls[2][2] == {10, 11}
    assert sorted(p.listener_id for p in driver.calls[2][1]) == [70, 71]
    assert driver.calls[3][1] == []
