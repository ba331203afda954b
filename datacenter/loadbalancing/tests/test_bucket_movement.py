"""The preview's bucket movement is the agents' own table: shares follow weights, removing a
backend moves its buckets (and Maglev's few others), and a drained backend leaves the table."""

from __future__ import annotations

import numpy as np

from datacenter.loadbalancing.bucket_movement import bucket_movement, bucket_shares, serving_backends
from lbagent.core.maglev import maglev_table

TABLE = 4093


def backends(*spec: tuple[str, int]) -> list[dict]:
    return [{"address": a, "port": 8080, "weight": w, "admin_state": "active"} for a, w in spec]


def test_shares_follow_weights_and_match_the_agents_table():
    listed = backends(("10.0.0.1", 1), ("10.0.0.2", 3))
    shares = bucket_shares(listed, TABLE)
    assert abs(shares["10.0.0.1:8080"] - 0.25) < 0.01
    assert abs(shares["10.0.0.2:8080"] - 0.75) < 0.01
    table = maglev_table(["10.0.0.1:8080", "10.0.0.2:8080"], [1, 3], table_size=TABLE)
    assert shares["10.0.0.1:8080"] == np.count_nonzero(table == 0) / TABLE


def test_removing_one_of_four_moves_its_buckets_and_few_others():
    before = backends(("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1), ("10.0.0.4", 1))
    movement = bucket_movement(before, before[:3], TABLE)
    own = round(movement["shares_before"]["10.0.0.4:8080"] * TABLE)
    # Maglev is nearly, not perfectly, minimally disruptive: a few other buckets move too
    assert own <= movement["moved_buckets"] < own + 0.02 * TABLE
    assert 0.2 < movement["moved_share"] < 0.3


def test_drained_and_disabled_backends_get_no_buckets():
    listed = backends(("10.0.0.1", 1), ("10.0.0.2", 1))
    listed[1]["admin_state"] = "draining"
    assert serving_backends(listed) == (("10.0.0.1:8080", 1),)
    assert bucket_shares(listed, TABLE) == {"10.0.0.1:8080": 1.0}


def test_empty_sides():
    one = backends(("10.0.0.1", 1))
    assert bucket_movement([], [], TABLE)["moved_share"] == 0
    assert bucket_movement([], one, TABLE)["moved_share"] == 1.0
    assert bucket_movement(one, one, TABLE)["moved_buckets"] == 0
