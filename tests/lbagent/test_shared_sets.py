"""The shared sets' slots and keys (no root, no kernel): every listener's elements live under its
own slot (`slot << 17 | bucket`, `slot << 17 . MAC`), slots are unique among live listeners,
kept for a listener's life and reused after it goes; a model of the shared sets replaying what
the driver sends holds exactly the plans after every apply, and never sees an element added
twice or a missing one deleted (the kernel would refuse both). tests/lab/test_incremental.py
reads the same layout from a real kernel."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.flowhash import MARK_BUCKET_BITS, MARK_BUCKET_MASK, MARK_SLOT_MASK, bucket_of_mark
from lbagent.dataplane.nft import MAX_BUCKETS, MAX_SLOTS, SHARED, ListenerPlan, NftDataplane, slot_base
from lbagent.dataplane.nftlink import FillOp, Op

_ELEMENTS = re.compile(r"^(add|delete) element netdev lbagent (\w+) \{ (.*) \}$")


class ModelNft:
    """Stands in for libnftables: keeps the shared sets' elements as the kernel would, from the
    transaction text (the driver sends everything as text without a netlink writer)."""

    def __init__(self) -> None:
        self.sets: dict[str, dict] = {}
        self.flushed: list[str] = []

    def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
        for line in text.splitlines():
            if line.startswith(("add map", "add set")) and line.split()[4].endswith(("_a", "_b")):
                self.sets.setdefault(line.split()[4], {})
            if line.startswith(("flush map", "flush set")) and line.split()[4] in self.sets:
                self.flushed.append(line)
            found = _ELEMENTS.match(line)
            if found is None or found.group(2) not in self.sets:
                continue
            verb, name, items = found.groups()
            content = self.sets[name]
            for item in items.split(", "):
                key, _, value = item.partition(" : ")
                if verb == "add":
                    assert key not in content, f"{name}: {key} added twice ({line[:200]})"
                    content[key] = value or None
                else:
                    assert key in content, f"{name}: {key} deleted but not there ({line[:200]})"
                    del content[key]
        return '{"nftables": []}'


class ModelElements:
    """Stands in for the netlink writer: each batch's ops go to the same model, in order (one
    transaction each, as the kernel takes them)."""

    def __init__(self, model: ModelNft) -> None:
        self.model = model

    def run(self, table: str, ops) -> None:
        self.model.run("\n".join(op.text(f"netdev {table}") for op in ops))


def _expected(dp: NftDataplane, plans: list[ListenerPlan]) -> dict[str, dict]:
    out: dict[str, dict] = {f"{kind}_a": {} for kind in SHARED}
    for plan in plans:
        base = slot_base(dp.slot_of(plan.listener_id))
        for bucket, index in enumerate(plan.current.tolist()):
            if index >= 0:
                out["cur_a"][str(base + bucket)] = plan.backends[index][1]
        for bucket in (plan.unstable.tolist() if plan.unstable is not None else []):
            out["unstable_a"][str(base + bucket)] = None
        for mac in set(plan.pin_macs):
            out["pinok_a"][f"{base} . {mac}"] = None
        for address, mac in plan.backends:
            name = f'"cb{plan.listener_id}_{address.replace(".", "_")}"'
            out["cnt_a"].setdefault(f"{base} . {mac}", name)
    return out


def _backends(count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"10.0.0.{i + 1}", f"02:00:00:00:00:{i + 1:02x}") for i in range(count))


@st.composite
def _plans(draw) -> list[ListenerPlan]:
    ids = draw(st.lists(st.integers(1, 9), unique=True, max_size=6))
    plans = []
    for lid in ids:
        size = draw(st.sampled_from([5, 7, 11]))
        count = draw(st.integers(1, 4))
        current = np.array(draw(st.lists(st.integers(-1, count - 1), min_size=size, max_size=size)),
                           dtype=np.int64)
        old = unstable = None
        if draw(st.booleans()):
            old = np.array(draw(st.lists(st.integers(-1, count - 1), min_size=size, max_size=size)),
                           dtype=np.int64)
            unstable = np.flatnonzero(old != current)
        backends = _backends(count)
        pins = tuple(m for _, m in backends if draw(st.booleans()))
        plans.append(ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, backends, current, old, unstable,
                                  pin_timeout_s=60, pin_macs=pins))
    return plans


@settings(max_examples=120, deadline=None)
@given(st.lists(_plans(), min_size=1, max_size=6), st.booleans())
def test_every_listener_keeps_its_slot_and_the_shared_sets_hold_exactly_the_plans(applies, netlink):
    """Through libnftables text alone, or rules as text and elements as netlink batches."""
    nft = ModelNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=nft, nflog_group=3,
                      elements=ModelElements(nft) if netlink else None)
    slots: dict[int, int] = {}
    for plans in applies:
        gone = {lid: slot for lid, slot in slots.items() if lid not in {p.listener_id for p in plans}}
        held_before = {lid: slot for lid, slot in slots.items() if lid not in gone}
        dp.apply(plans)
        slots = {p.listener_id: dp.slot_of(p.listener_id) for p in plans}
        assert len(set(slots.values())) == len(slots), f"two listeners share a slot: {slots}"
        # a listener keeps its slot; a new one takes the lowest slot neither held nor being
        # emptied by this apply (in the plans' order)
        taken = set(held_before.values()) | set(gone.values())
        for plan in plans:
            lid = plan.listener_id
            if lid in held_before:
                assert slots[lid] == held_before[lid], f"listener {lid} moved from {held_before[lid]}"
            else:
                lowest = min(set(range(len(taken) + 1)) - taken)
                assert slots[lid] == lowest, (lid, slots[lid], sorted(taken))
                taken.add(lowest)
        assert nft.sets == _expected(dp, plans)
    assert nft.flushed == [], "a shared set was flushed"


def test_new_listeners_take_the_lowest_free_slot_after_the_removal_is_done():
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=ModelNft())

    def plan(lid: int) -> ListenerPlan:
        return ListenerPlan(lid, f"203.0.113.{lid}", "udp", 53, _backends(1), np.zeros(5, dtype=np.int64))

    dp.apply([plan(1), plan(2), plan(3)])
    assert [dp.slot_of(lid) for lid in (1, 2, 3)] == [0, 1, 2]
    # 1 goes and 4 comes in the same apply: 4 must not take slot 0, whose elements are deleted
    # only at the end of that apply
    dp.apply([plan(2), plan(3), plan(4)])
    assert dp.slot_of(4) == 3
    dp.apply([plan(2), plan(3), plan(4), plan(5)])
    assert dp.slot_of(5) == 0, "slot 0 is free again"
    with pytest.raises(KeyError):
        dp.slot_of(1)


def test_more_listeners_than_slots_are_refused():
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=ModelNft())
    table = np.zeros(3, dtype=np.int64)
    plans = [ListenerPlan(lid, f"10.{lid >> 16}.{(lid >> 8) & 255}.{lid & 255}", "udp", 53, (), table)
             for lid in range(MAX_SLOTS + 1)]
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS}"):
        dp.apply(plans)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_SLOTS - 1), st.integers(0, MAX_BUCKETS - 1))
def test_a_mark_is_slot_and_bucket(slot, bucket):
    mark = slot_base(slot) | bucket
    assert mark < 2**32
    assert bucket_of_mark(mark) == bucket
    assert mark & MARK_SLOT_MASK == slot << MARK_BUCKET_BITS
    assert mark >> MARK_BUCKET_BITS == slot
    assert MARK_BUCKET_MASK == MAX_BUCKETS - 1


def _element_keys(attrs: bytes) -> list[bytes]:
    """Each element's key bytes from a set-element message's attributes (table, set, list)."""
    def nlas(data: bytes) -> list[tuple[int, bytes]]:
        out, pos = [], 0
        while pos + 4 <= len(data):
            length, kind = struct.unpack_from("=HH", data, pos)
            out.append((kind & 0x3FFF, data[pos + 4:pos + length]))
            pos += (length + 3) & ~3
        return out

    elements = next(payload for kind, payload in nlas(attrs) if kind == 3)  # NFTA_SET_ELEM_LIST_ELEMENTS
    keys = []
    for _, elem in nlas(elements):
        key = next(payload for kind, payload in nlas(elem) if kind == 1)  # NFTA_SET_ELEM_KEY
        keys.append(next(payload for kind, payload in nlas(key) if kind == 1))  # NFTA_DATA_VALUE
    return keys


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_SLOTS - 1), st.lists(st.integers(0, MAX_BUCKETS - 1), min_size=1, max_size=50,
                                               unique=True))
def test_netlink_keys_are_the_mark_in_host_order_and_slot_dot_mac(slot, buckets):
    """`cur`/`unstable` keys: the 32-bit mark as `meta mark` loads it (host order), also for
    the high slots (marks above 2^31); `pinok`/`cnt` keys: the slot's mark, then the MAC padded
    to 8 bytes (nft's concatenation registers)."""
    base = slot_base(slot)
    marks = np.array(buckets, dtype=np.int64) + base
    for op in (Op("add", "unstable_a", marks),
               FillOp("cur_a", _backends(1), np.zeros(MAX_BUCKETS, dtype=np.int64)[:max(buckets) + 1], base)):
        keys = [k for _, _, attrs, _ in op.messages("lbagent") for k in _element_keys(attrs)]
        expected = marks if isinstance(op, Op) else np.arange(max(buckets) + 1) + base
        assert keys == [struct.pack("=I", int(m)) for m in expected]
    mac = "02:00:00:00:12:34"
    op = Op("add", "cnt_a", [(base, mac)], ["cb1_10_0_0_1"], "slotmac", "objref")
    (key,) = [k for _, _, attrs, _ in op.messages("lbagent") for k in _element_keys(attrs)]
    assert key == struct.pack("=I", base) + bytes.fromhex("020000001234") + b"\0\0"
    text = f'add element netdev lbagent cnt_a {{ {base} . {mac} : "cb1_10_0_0_1" }}'
    assert op.text("netdev lbagent") == text


def test_a_restart_fills_the_other_generation_before_moving_any_rule(monkeypatch):
    """A driver starting on a table of generation a (a restarted daemon): it creates the b sets
    and their bucket chain, writes every listener's elements there, only then rewrites the
    listeners' rules (which jump to bucket_b), and deletes generation a last: no listener ever
    points at a set without its elements."""
    from lbagent.dataplane import nft as nft_module

    monkeypatch.setattr(nft_module, "read_counters", lambda table, **kwargs: {})
    events: list[tuple[str, str]] = []
    held = {"maps": [("map", "cur_a"), ("map", "cnt_a"), ("map", "pins_tcp")],
            "sets": [("set", "unstable_a"), ("set", "pinok_a")],
            "chains": [("chain", "l1"), ("chain", "bucket_a"), ("chain", "ingress")]}

    class KernelOfGenerationA:
        def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
            if text.startswith("list "):
                kind = text.split()[1]
                items = [{k: {"family": "netdev", "table": "lbagent", "name": name}}
                         for k, name in held[kind]]
                return json.dumps({"nftables": items})
            events.append(("text", text))
            return '{"nftables": []}'

    class Elements:
        def run(self, table: str, ops) -> None:
            events.append(("netlink", "\n".join(op.text(f"netdev {table}") for op in ops)))

    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=KernelOfGenerationA(), elements=Elements(),
                      nflog_group=3)
    plans = [ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, _backends(2), np.array([0, 1, 0, 1, 1]),
                          pin_macs=tuple(m for _, m in _backends(2))) for lid in (1, 2)]
    dp.apply(plans)
    assert dp.generation == "b"
    kinds = [kind for kind, _ in events]
    first_rules = next(i for i, (_, text) in enumerate(events) if "add rule netdev lbagent l1 " in text)
    elements = [i for i, (kind, text) in enumerate(events) if kind == "netlink" and "cur_b" in text]
    assert kinds[0] == "text"
    assert "add map netdev lbagent cur_b" in events[0][1]
    assert "add rule netdev lbagent bucket_b ether daddr set meta mark map @cur_b" in events[0][1]
    assert "add rule" not in events[0][1].replace("add rule netdev lbagent bucket_b", ""), \
        "the first transaction moves no listener"
    assert elements, "no element went to the new generation"
    assert max(elements) < first_rules, "a listener's rules went before its elements"
    assert "jump bucket_b" in events[first_rules][1]
    assert not [ln for _, text in events for ln in text.splitlines()
                if ln.startswith("add element") and "_a " in ln], "an element went to the old generation"
    deletion = next(i for i, (_, text) in enumerate(events) if "delete map netdev lbagent cur_a" in text)
    assert deletion > first_rules
    assert "delete chain netdev lbagent bucket_a" in events[deletion][1]


def _edit(draw, before: list[ListenerPlan]) -> list[ListenerPlan]:
    """The next apply's plans: some kept as the very objects, some replaced, some gone, some new."""
    plans = []
    for plan in before:
        fate = draw(st.sampled_from(["keep", "keep", "replace", "drop"]))
        if fate == "keep":
            plans.append(plan)
        elif fate == "replace":
            plans.append(draw(_plans_with_ids([plan.listener_id]))[0])
    held = {p.listener_id for p in before}
    new_ids = draw(st.lists(st.integers(1, 12).filter(lambda i: i not in held), unique=True, max_size=3))
    return plans + draw(_plans_with_ids(new_ids))


@st.composite
def _plans_with_ids(draw, ids: list[int]) -> list[ListenerPlan]:
    out = []
    for lid in ids:
        count = draw(st.integers(1, 3))
        current = np.array(draw(st.lists(st.integers(-1, count - 1), min_size=7, max_size=7)), dtype=np.int64)
        backends = _backends(count)
        out.append(ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, backends, current,
                                pin_timeout_s=60, pin_macs=tuple(m for _, m in backends)))
    return out


@settings(max_examples=80, deadline=None)
@given(st.data(), st.booleans())
def test_applies_hinted_with_what_changed_leave_the_same_kernel_as_unhinted_ones(data, lie):
    """The daemon tells the driver which plans it made anew and which listeners went, so the driver
    does not look at thousands of unchanged plans. Hinted or not, the shared sets end the same; a
    hint whose counts do not add up (here: a new listener left out) is ignored, not trusted."""
    hinted_nft, plain_nft = ModelNft(), ModelNft()
    hinted = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=hinted_nft, nflog_group=3,
                          elements=ModelElements(hinted_nft))
    plain = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=plain_nft, nflog_group=3,
                         elements=ModelElements(plain_nft))
    plans = data.draw(_plans_with_ids([1, 2, 3, 4]))
    hinted.apply(plans)
    plain.apply(plans)
    for _ in range(data.draw(st.integers(1, 5))):
        before = plans
        plans = _edit(data.draw, before)
        changed = [p for p in plans if all(p is not q for q in before)]
        removed = {p.listener_id for p in before} - {p.listener_id for p in plans}
        new = [p for p in changed if p.listener_id not in {q.listener_id for q in before}]
        if lie and new:
            changed = [p for p in changed if p is not new[0]]  # a caller's mistake: a new listener not named
        hinted.apply(plans, changed=changed, removed=removed)
        plain.apply(plans)
        assert hinted_nft.sets == _expected(hinted, plans)
        assert plain_nft.sets == _expected(plain, plans)
        assert {p.listener_id: hinted.slot_of(p.listener_id) for p in plans} == \
            {p.listener_id: plain.slot_of(p.listener_id) for p in plans}
