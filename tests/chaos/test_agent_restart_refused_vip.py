"""Issue 16 (chaos, part 2): a mux daemon restarted while one VIP's desired state is refused keeps
serving that VIP's last good state, with real traffic through the kernel.

In a lab of its own (the same builder as `lbagent lab up`, unique prefix, torn down after this
module): a VIP runs on mux-1 alone (the other mux is stopped, so every connection crosses mux-1).
mux-1 then gets a document whose part for that VIP it refuses (a backend whose MAC no neighbour
answers for), keeps the VIP on its last good tables, and is restarted by PID with that document
still in place. After the restart the VIP is still refused, still announced by mux-1 and still
forwarded to its last good backends: the daemon read them back from its file in run_dir/last-good/
(one per VIP, written atomically after each apply), not from the refused document.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from lbagent.lab import topology
from lbagent.lab.harness import (
    LabCluster,
    backend_doc,
    connect_and_ask,
    listener_doc,
    vip_doc,
    wait_route,
    write_atomically,
)
from tests.lab.conftest import _lab_prerequisites

pytestmark = [pytest.mark.chaos, pytest.mark.lab, pytest.mark.slow]

VIP = "203.0.113.16"
LISTENER = 16
GHOST = {"address": "10.90.0.98", "port": 80, "weight": 1, "state": "active", "mac": None, "host": "ghost"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    _lab_prerequisites()
    lab = topology.build()
    try:
        running = LabCluster(lab)
        running.start()
        try:
            yield running
        finally:
            running.stop_all()
    finally:
        topology.teardown(lab)


def test_a_restarted_mux_keeps_serving_a_refused_vip_from_its_last_good_state(cluster: LabCluster) -> None:
    lab = cluster.lab
    mux, other = cluster.muxes
    good_backends = lab.backends[:2]
    cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, [backend_doc(b) for b in good_backends])]))
    wait_route(lab, VIP, [m.address for m in lab.muxes], timeout_s=60)
    other.stop()  # every connection now crosses `mux`
    wait_route(lab, VIP, [mux.mux.address], timeout_s=60)

    def refused() -> set[str]:
        return {
            dict(labels)["vip"]
            for (name, labels), value in mux.metrics().items()
            if name == "lbagent_vip_refused" and value == 1
        }

    def answers() -> set[str]:
        return {connect_and_ask(lab.clients[0].netns, VIP)[2] for _ in range(40)}

    good_names = {b.name for b in good_backends}
    assert answers() <= good_names
    broken = json.loads(mux.config.read_text())
    listener = next(v for v in broken["vips"] if v["address"] == VIP)["listeners"][0]
    listener["previous"] = {
        "generation": listener["generation"],
        "backends": listener["backends"],
        "drain_deadline": time.time() + 60,
    }
    listener["generation"] += 1
    listener["backends"] = [*listener["backends"], GHOST]
    broken["generation"] = cluster.generation + 1
    try:
        write_atomically(mux.config, json.dumps(broken))
        mux.wait_applied(broken["generation"], timeout_s=60)
        assert refused() == {VIP}
        assert sorted(p.name for p in (mux.dir / "last-good").iterdir()) == [f"{VIP}.json"]
        last_good = json.loads((mux.dir / "last-good" / f"{VIP}.json").read_text())
        assert last_good["vip"]["address"] == VIP
        assert GHOST["address"] not in json.dumps(last_good), "the refused state was saved as the good one"

        # Restart by PID with the refused document still in place.
        pid = mux.proc.pid
        mux.stop()
        mux.start()
        assert mux.proc.pid != pid
        mux.wait_applied(broken["generation"], timeout_s=60)
        mux.wait_bgp_up(timeout_s=60)
        assert refused() == {VIP}, "the restarted daemon applied a document it should refuse"
        wait_route(lab, VIP, [mux.mux.address], timeout_s=60)  # still announced by the restarted mux
        packets_before = mux.metric("lbagent_listener_packets_total", listener=str(LISTENER))
        assert answers() <= good_names  # every connection answered, by a last good backend
        assert mux.metric("lbagent_listener_packets_total", listener=str(LISTENER)) > packets_before
        assert "last good state of 1 VIP(s) loaded" in mux.log_tail(20000)
    finally:
        cluster.generation += 2  # keep the cluster's numbering ahead of what this mux saw
        cluster.restart(mux)
        cluster.restart(other)
    assert refused() == set()
    cluster.remove_vip(VIP)
