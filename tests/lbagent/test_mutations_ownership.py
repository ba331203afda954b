"""Hand-over after a live-set change, checked exactly (found by applying one-line mutations to
lbagent/core: a plan that also "sent" records to the mux itself passed every other test)."""

from lbagent.core.ownership import build_ownership, hand_over_plan

M = 1021
MUXES = [f"mux-{i}" for i in range(5)]


def test_a_hand_over_plan_is_exactly_the_new_owners_other_than_me():
    old = build_ownership(MUXES, owner_seed=3, table_size=M)
    new = build_ownership([*MUXES, "mux-9"], owner_seed=3, table_size=M)
    me = "mux-0"
    held = [(f"r{b}", b) for b in range(M) if me in old.owners(b)]
    send, drop = hand_over_plan(held, new, me)
    expected: dict[str, list[str]] = {}
    for rid, b in held:
        for target in new.owners(b):
            if target is not None and target != me:
                expected.setdefault(target, []).append(rid)
    assert me not in send  # a mux never sends records to itself
    assert send == expected
    assert drop == [rid for rid, b in held if me not in new.owners(b)]


def test_a_lone_mux_sends_nothing_and_keeps_everything():
    solo = build_ownership(["mux-0"], owner_seed=3, table_size=M)
    held = [("r1", 1), ("r2", 500)]
    assert hand_over_plan(held, solo, "mux-0") == ({}, [])
