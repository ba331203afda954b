"""Small desired-state documents for the agent's tests without a lab: one mux, `mux-a`, with fixed
seeds and keys; the caller gives the VIPs."""

from __future__ import annotations


def one_mux_document(generation: int, vips: list[dict]) -> dict:
    return {
        "version": 1,
        "generation": generation,
        "node": "mux-a",
        "cluster": {"hash_seed": 1, "table_size": 251, "owner_seed": 2, "max_records": 1000,
                    "muxes": [{"name": "mux-a", "address": "10.0.0.1", "peer_port": 7070}],
                    "peer_key": "00" * 16, "redirect_key": "11" * 16},
        "vips": vips,
    }
