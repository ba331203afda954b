"""Decisions as each role a mux can play for a flow: primary owner, backup owner, neither.

Written to kill one-line bugs that the rule-by-rule tests let through (issue 16): a mux that
took the *backup* for the owner (`if self_mux in (primary, backup)`) would record and answer the
old table itself instead of asking the primary, so a flow the primary recorded at its SYN could
be sent to another backend. Pure and fast; no root needed.
"""

import numpy as np
import pytest

from lbagent.core.decide import AskOwner, Forward, Reason, RecordAndForward, decide
from lbagent.core.ownership import build_ownership
from lbagent.core.transition import ListenerTables, build_generation

M = 1021
OLD = build_generation(4, ["b0", "b1", "b2", "b3"], table_size=M)
NEW = build_generation(5, ["b0", "b1", "b2", "b3", "b4"], table_size=M)
TRANS = ListenerTables(OLD).with_generation(NEW, drain_deadline=100.0)
UNSTABLE = int(np.flatnonzero(TRANS.unstable)[0])
OWNERSHIP = build_ownership(["mux-a", "mux-b", "mux-c"], owner_seed=11, table_size=M)
PRIMARY, BACKUP = OWNERSHIP.owners(UNSTABLE)
BYSTANDER = next(m for m in OWNERSHIP.muxes if m not in (PRIMARY, BACKUP))


def decide_as(me: str, *, is_syn: bool = False, local_record: str | None = None):
    return decide(tables=TRANS, bucket=UNSTABLE, is_syn=is_syn, pin=None, local_record=local_record,
                  owners=(PRIMARY, BACKUP), self_mux=me)


def test_the_fixture_flow_has_three_distinct_roles():
    assert len({PRIMARY, BACKUP, BYSTANDER}) == 3
    # the old and new tables disagree here, so answering from either table is observable
    assert TRANS.fallback_backend(UNSTABLE) != TRANS.current_backend(UNSTABLE)


def test_the_primary_without_a_record_records_the_old_tables_backend():
    assert decide_as(PRIMARY) == RecordAndForward(
        TRANS.fallback_backend(UNSTABLE), PRIMARY, BACKUP, Reason.OWNER_OLD_TABLE)


@pytest.mark.parametrize("me", [BACKUP, BYSTANDER], ids=["backup", "bystander"])
def test_a_mux_that_is_not_the_primary_asks_the_primary_first(me):
    # The backup may lack a replica of a record the primary made a moment ago: only the primary
    # is the first writer, so the backup asks it rather than recording on its own.
    assert decide_as(me) == AskOwner(PRIMARY, BACKUP, TRANS.fallback_backend(UNSTABLE))


@pytest.mark.parametrize("me", [PRIMARY, BACKUP, BYSTANDER], ids=["primary", "backup", "bystander"])
def test_a_held_record_answers_on_any_role(me):
    assert decide_as(me, local_record="b9") == Forward("b9", Reason.LOCAL_RECORD, pin=True)


@pytest.mark.parametrize("me", [PRIMARY, BACKUP, BYSTANDER], ids=["primary", "backup", "bystander"])
def test_a_syn_uses_the_new_table_and_names_the_same_owners_on_every_role(me):
    assert decide_as(me, is_syn=True) == RecordAndForward(
        TRANS.current_backend(UNSTABLE), PRIMARY, BACKUP, Reason.NEW_FLOW)


def test_a_single_mux_is_primary_with_no_backup_and_never_asks():
    solo = build_ownership(["mux-a"], owner_seed=11, table_size=M)
    owners = solo.owners(UNSTABLE)
    assert owners == ("mux-a", None)
    action = decide(tables=TRANS, bucket=UNSTABLE, is_syn=False, pin=None, local_record=None,
                    owners=owners, self_mux="mux-a")
    assert action == RecordAndForward(TRANS.fallback_backend(UNSTABLE), "mux-a", None,
                                      Reason.OWNER_OLD_TABLE)
