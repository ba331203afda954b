"""The demo muxes' synthetic load goes through the table they applied: new flows per backend
follow the bucket shares, every report says simulated, and counter names fit the protocol."""

from __future__ import annotations

import re

from lbagent.demo import SimulatedLoadDriver, backend_counter_name
from lbagent.state import StateParser

STATE = {
    "version": 1,
    "generation": 3,
    "node": "demo-mux-1",
    "cluster": {
        "hash_seed": 24301,
        "table_size": 4093,
        "owner_seed": 7919,
        "max_records": 1000,
        "muxes": [{"name": "demo-mux-1", "address": "10.0.0.2", "peer_port": 4790}],
        "peer_key": "00" * 32,
        "redirect_key": "11" * 32,
    },
    "vips": [
        {
            "address": "203.0.113.10",
            "bypass": False,
            "bypass_next_hop": None,
            "fast_path": False,
            "listeners": [
                {
                    "id": 7,
                    "protocol": "tcp",
                    "port": 80,
                    "generation": 2,
                    "drain_timeout_s": 30,
                    "previous": None,
                    "health_check": None,
                    "backends": [
                        {
                            "address": "10.1.0.5",
                            "port": 8080,
                            "weight": 1,
                            "state": "active",
                            "mac": None,
                            "host": None,
                        },
                        {
                            "address": "10.1.0.6",
                            "port": 8080,
                            "weight": 3,
                            "state": "active",
                            "mac": None,
                            "host": None,
                        },
                    ],
                }
            ],
        }
    ],
}


def test_synthetic_flows_follow_the_applied_table():
    driver = SimulatedLoadDriver(flows_per_s=20_000, seed=1)
    driver.apply(StateParser().parse(STATE))
    driver.tick(1.0)
    counters = driver.counters()
    assert counters["simulated"] == 1
    assert counters["new_flows"] == 20_000
    light = counters[backend_counter_name(7, "10.1.0.5", 8080)]
    heavy = counters[backend_counter_name(7, "10.1.0.6", 8080)]
    assert light + heavy == 20_000
    assert 0.22 < light / 20_000 < 0.28, "weight 1 of 4 gets about a quarter of new flows"
    assert counters["slowpath_decisions"] == 0, "no transition: no slow path"
    assert all(re.fullmatch(r"[a-z][a-z0-9_.]{0,63}", name) for name in counters)
