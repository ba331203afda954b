"""A change to one listener touches only that listener's kernel objects (real nftables in a
throwaway namespace): the other listeners' rules keep their handles (a flush and re-add would
renumber them) and their elements in the shared sets stay; a backend change writes no rule at
all; each listener hashes over its own table size into its own slot; what the kernel holds under
a listener's slot is exactly the plan."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from lbagent.core.flowhash import flow_bucket
from lbagent.core.maglev import maglev_table
from lbagent.dataplane import nft as nft_module
from lbagent.dataplane.nft import ListenerPlan, Nft, NftDataplane, NftError
from lbagent.dataplane.nftlink import NetlinkElements, NetlinkError, Op
from tests.environment import need_binary, need_root


class NamespaceNft(Nft):
    """libnftables' own command language, sent to the `nft` binary inside the test's namespace."""

    def __init__(self, netns: str) -> None:
        self._lib = None
        self.netns = netns

    def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
        argv = ["ip", "netns", "exec", self.netns, "nft", *(["-j"] if json_output else []),
                *(["-t"] if terse else []), "-a"]
        # The CLI prints JSON listings only for a command given as arguments, not read with -f.
        listing = text.startswith("list ")
        argv += text.split() if listing else ["-f", "-"]
        proc = subprocess.run(argv, input=None if listing else text, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise NftError(f"nft: {proc.stderr.strip()[:2000]}")
        if json_output and not proc.stdout.strip():
            return '{"nftables": []}'  # the CLI prints nothing for an empty listing (the library does)
        return proc.stdout


@pytest.fixture
def netns():
    need_root()
    need_binary("nft", "ip")
    name = f"dcinc{os.getpid()}{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                       check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _backends(lid: int, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"10.{lid}.0.{i + 1}", f"02:00:00:{lid:02x}:00:{i + 1:02x}") for i in range(count))


def _plan(lid: int, size: int, count: int, old: np.ndarray | None = None) -> ListenerPlan:
    current = maglev_table([f"b{i}" for i in range(count)], None, size)
    unstable = None if old is None else np.flatnonzero(current != old)
    return ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, _backends(lid, count), current, old, unstable,
                        pin_timeout_s=60)


def _handles(nft: NamespaceNft, lid: int) -> dict[str, list[int]]:
    """Rule handles of every chain of a listener (l<id>, and b<id>_* of an older format)."""
    out = json.loads(nft.run("list chains netdev", json_output=True))
    chains = [c["chain"]["name"] for c in out["nftables"] if "chain" in c
              and (c["chain"]["name"] == f"l{lid}" or c["chain"]["name"].startswith(f"b{lid}_"))]
    handles: dict[str, list[int]] = {}
    for chain in chains:
        listing = json.loads(nft.run(f"list chain netdev lbagent {chain}", json_output=True))
        handles[chain] = [r["rule"]["handle"] for r in listing["nftables"] if "rule" in r]
    return handles


def _elements(nft: NamespaceNft, kind: str, name: str) -> dict:
    """A map's elements as {key: value} (a set's as {key: None}), read from the kernel."""
    listing = json.loads(nft.run(f"list {kind} netdev lbagent {name}", json_output=True))
    obj = next(item[kind] for item in listing["nftables"] if kind in item)
    elems = obj.get("elem", [])
    # Concatenated keys (dispatch, pins) are JSON objects: keyed by their JSON text.
    raw = [e[0] if kind == "map" else e for e in elems]
    keys = [json.dumps(k, sort_keys=True) if isinstance(k, dict) else k for k in raw]
    return dict(zip(keys, (e[1] for e in elems), strict=True)) if kind == "map" else dict.fromkeys(keys)


def _generation(nft: NamespaceNft) -> str:
    """The generation of shared sets the table holds (exactly one once an apply is done)."""
    listing = json.loads(nft.run("list maps netdev", json_output=True))["nftables"]
    maps = {item["map"]["name"] for item in listing if "map" in item}
    held = [g for g in ("a", "b") if f"cur_{g}" in maps]
    assert len(held) == 1, maps
    return held[0]


def _hash_rule(nft: NamespaceNft, lid: int) -> tuple[int, int]:
    """(table size, slot) of a listener, read from its hash rule in the kernel: `mod N` and
    `offset slot << 17` (nft lists no offset for 0)."""
    rules = nft.run(f"list chain netdev lbagent l{lid}")
    found = re.search(r"jhash ip6? saddr \. [^\n]*?th dport mod (\d+) seed 0x[0-9a-f]+(?: offset (\d+))?",
                      rules)
    assert found, rules
    offset = int(found.group(2) or 0)
    assert offset & 0x1FFFF == 0, f"offset {offset} is not a slot"
    return int(found.group(1)), offset >> 17


def _mine(nft: NamespaceNft, kind: str, lid: int) -> dict:
    """A listener's elements of a shared set (cur, unstable, pinok, cnt), found under the slot of
    its hash rule: cur -> {bucket: MAC}, unstable -> {bucket: None}, pinok -> {MAC: None},
    cnt -> {MAC: counter name}."""
    _, slot = _hash_rule(nft, lid)
    name = f"{kind}_{_generation(nft)}"
    out: dict = {}
    for key, value in _elements(nft, "map" if kind in ("cur", "cnt") else "set", name).items():
        if kind in ("cur", "unstable"):
            if int(key) >> 17 == slot:
                out[int(key) & 0x1FFFF] = value
        else:
            mark, mac = json.loads(key)["concat"]
            if int(mark) == slot << 17:
                out[mac] = value
    return out


def _planned_cur(plan: ListenerPlan) -> dict[int, str]:
    return {b: plan.backends[i][1] for b, i in enumerate(plan.current.tolist()) if i >= 0}


def _objects(nft: NamespaceNft) -> set[tuple[str, str]]:
    found = set()
    for what, kind in (("chains", "chain"), ("maps", "map"), ("sets", "set"), ("counters", "counter")):
        for item in json.loads(nft.run(f"list {what} netdev", json_output=True))["nftables"]:
            if kind in item:
                found.add((kind, item[kind]["name"]))
    return found


@pytest.mark.lab
def test_a_change_to_one_listener_leaves_the_others_untouched(netns):
    nft = NamespaceNft(netns)
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft, nflog_group=5)
    plans = [_plan(1, 409, 4), _plan(2, 409, 4), _plan(3, 809, 8)]
    dp.apply(plans)
    before = {lid: _handles(nft, lid) for lid in (1, 2, 3)}
    assert [_hash_rule(nft, lid) for lid in (1, 2, 3)] == [(409, 0), (409, 1), (809, 2)], \
        "each listener hashes over its own table size into its own slot"
    kinds = ("cur", "unstable", "pinok", "cnt")
    kept_before = {(lid, kind): _mine(nft, kind, lid) for lid in (1, 3) for kind in kinds}
    assert kept_before[(3, "cur")] == _planned_cur(plans[2])
    assert kept_before[(1, "cur")] == _planned_cur(plans[0])
    assert kept_before[(1, "cnt")] == {mac: f"cb1_{a.replace('.', '_')}" for a, mac in plans[0].backends}
    assert list(before[1]) == ["l1"], "one chain per listener, none per backend"
    assert len(before[1]["l1"]) >= 6, before[1]

    sent = dp.transactions
    # Listener 2 gets a fifth backend: a transition (unstable buckets, the new backend's counter).
    changed = _plan(2, 409, 5, old=plans[1].current)
    dp.apply([plans[0], changed, plans[2]])

    assert dp.transactions == sent + 1, "one change is one transaction"
    assert _handles(nft, 1) == before[1], "listener 1's rules were flushed or re-added"
    assert _handles(nft, 2) == before[2], "a new backend rewrote listener 2's rules"
    assert _handles(nft, 3) == before[3], "listener 3's rules were flushed or re-added"
    assert {(lid, kind): _mine(nft, kind, lid) for lid in (1, 3) for kind in kinds} == kept_before
    assert _mine(nft, "cur", 2) == _planned_cur(changed)
    assert _mine(nft, "cnt", 2)["02:00:00:02:00:05"] == "cb2_10_2_0_5"
    assert sorted(_mine(nft, "unstable", 2)) == changed.unstable.tolist()

    # A backend removed from listener 2: its counter and its counter element go, no rule moves.
    shrunk = _plan(2, 409, 4, old=changed.current)
    dp.apply([plans[0], shrunk, plans[2]])
    assert _handles(nft, 2) == before[2]
    assert _mine(nft, "cur", 2) == _planned_cur(shrunk)
    assert "02:00:00:02:00:05" not in _mine(nft, "cnt", 2)
    assert ("counter", "cb2_10_2_0_5") not in _objects(nft)

    # Removing listener 1 touches neither 2 nor 3, and leaves nothing of it behind.
    dp.apply([shrunk, plans[2]])
    assert _handles(nft, 3) == before[3]
    assert _handles(nft, 2) == before[2]
    assert _handles(nft, 1) == {}, "listener 1's chain is gone"
    mine = {"l1", "pinned1", "slow1", "newflows1"}
    assert [o for o in _objects(nft) if o[1] in mine or o[1].startswith("cb1_")] == []
    # nothing of slot 0 is left in the shared sets, and the others' elements are all there
    for kind in kinds:
        name = f"{kind}_a"
        keys = _elements(nft, "map" if kind in ("cur", "cnt") else "set", name)
        slots = {(int(k) if kind in ("cur", "unstable") else int(json.loads(k)["concat"][0])) >> 17
                 for k in keys}
        assert 0 not in slots, (name, sorted(slots))
    assert _mine(nft, "cur", 3) == _planned_cur(plans[2])
    # a new listener takes the free slot 0
    dp.apply([shrunk, plans[2], _plan(4, 409, 4)])
    assert _hash_rule(nft, 4) == (409, 0)
    assert _mine(nft, "cur", 4) == _planned_cur(_plan(4, 409, 4))
    assert _mine(nft, "cur", 3) == _planned_cur(plans[2])


def _in_netns(netns: str, work):
    """Run `work()` on a thread that joined the namespace (setns changes only the calling
    thread), so libnftables and the netlink writer talk to that namespace's nf_tables."""
    import ctypes
    import threading

    result: dict = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{netns}") as f:
            if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                result["error"] = OSError(ctypes.get_errno(), "setns")
                return
        try:
            result["value"] = work()
        except BaseException as exc:  # handed to the test's thread, re-raised there
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.lab
def test_backend_changes_go_as_netlink_messages_and_land_exactly(netns):
    """The daemon's driver (libnftables for rules, netlink for the rest): a whole load, a drain,
    a new backend and a removed listener; after each the kernel holds exactly the plan, and
    only the load wrote rules."""
    cli = NamespaceNft(netns)
    plans = [_plan(1, 409, 8), _plan(2, 409, 8), _plan(3, 409, 8)]
    # Chunks of one listener and batches of 500 elements: the load's rules go in three
    # libnftables transactions while the sender thread writes the elements behind them.
    dp = _in_netns(netns, lambda: NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nflog_group=5,
                                               batch_elements=500, batch_listeners=1))
    _in_netns(netns, lambda: dp.apply(plans))
    assert dp.netlink_transactions >= 3, "the load's elements went in bounded batches"
    assert dp.transactions - dp.netlink_transactions >= 3, "the rules went in chunks"
    for plan in plans:
        assert _mine(cli, "cur", plan.listener_id) == _planned_cur(plan)
    before = {lid: _handles(cli, lid) for lid in (1, 2, 3)}
    drained = _plan(2, 409, 7, old=plans[1].current)
    # The drained backend stays in the plan (its connections drain): same backends, new tables.
    drained = ListenerPlan(2, drained.vip, "tcp", 80, plans[1].backends, drained.current, drained.old,
                           drained.unstable, pin_timeout_s=60,
                           pin_macs=tuple(m for _, m in plans[1].backends[:7]))
    sent, by_netlink = dp.transactions, dp.netlink_transactions
    _in_netns(netns, lambda: dp.apply([plans[0], drained, plans[2]]))
    assert dp.transactions == sent + 1
    assert dp.netlink_transactions == by_netlink + 1, "the drain went through libnftables"
    assert {lid: _handles(cli, lid) for lid in (1, 2, 3)} == before
    assert _mine(cli, "cur", 2) == _planned_cur(drained)
    unstable = sorted(_mine(cli, "unstable", 2))
    assert unstable == sorted(drained.unstable.tolist())
    assert len(unstable) > 0
    assert sorted(_mine(cli, "pinok", 2)) == sorted(drained.pin_macs)

    grown = _plan(3, 409, 9, old=plans[2].current)
    sent, by_netlink = dp.transactions, dp.netlink_transactions
    _in_netns(netns, lambda: dp.apply([plans[0], drained, grown]))
    assert (dp.transactions, dp.netlink_transactions) == (sent + 1, by_netlink + 1)
    assert _mine(cli, "cur", 3) == _planned_cur(grown)
    assert _mine(cli, "cnt", 3) == {mac: f"cb3_{a.replace('.', '_')}" for a, mac in grown.backends}

    sent, by_netlink = dp.transactions, dp.netlink_transactions
    _in_netns(netns, lambda: dp.apply([drained, grown]))
    assert (dp.transactions, dp.netlink_transactions) == (sent + 1, by_netlink + 1), "a removal is netlink"
    assert _handles(cli, 1) == {}
    dispatch = _elements(cli, "map", "dispatch")
    assert sorted(v["jump"]["target"] for v in dispatch.values()) == ["l2", "l3"]


@pytest.mark.lab
def test_a_restarted_driver_fills_a_new_generation_with_another_size(netns):
    """A daemon restarted with another table size for a listener (a new backend_cap) fills the
    other generation of the shared sets (it cannot know which elements of the old one are
    whose), moves every listener's rules to it and deletes the old one: listener 1 hashes over
    its new size and holds its new table, listener 2 holds what it held; pins stay."""
    nft = NamespaceNft(netns)
    NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft).apply([_plan(1, 409, 4), _plan(2, 409, 4)])
    assert _generation(nft) == "a"
    kept = {kind: _mine(nft, kind, 2) for kind in ("cur", "unstable", "pinok", "cnt")}
    nft.run("add element netdev lbagent pins_tcp { 10.9.9.9 . 203.0.113.1 . 40000 . 80 timeout 600s "
            ": 02:00:00:01:00:01 }\n")
    restarted = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft)
    restarted.apply([_plan(1, 809, 4), _plan(2, 409, 4)])
    assert _generation(nft) == "b", "the old generation is gone"
    assert _hash_rule(nft, 1)[0] == 809
    assert _mine(nft, "cur", 1) == _planned_cur(_plan(1, 809, 4))
    assert {kind: _mine(nft, kind, 2) for kind in ("cur", "unstable", "pinok", "cnt")} == kept
    assert len(_elements(nft, "map", "pins_tcp")) == 1, "the pins survive the restart"
    again = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft)
    again.apply([_plan(1, 809, 4), _plan(2, 409, 4)])
    assert _generation(nft) == "a", "and back"
    assert _mine(nft, "cur", 1) == _planned_cur(_plan(1, 809, 4))
    assert {kind: _mine(nft, kind, 2) for kind in ("cur", "unstable", "pinok", "cnt")} == kept


@pytest.mark.lab
def test_an_older_daemons_table_format_is_replaced_at_the_first_apply(netns):
    """A mux upgraded from the per-backend-chain format (a `cur_` verdict map jumping to one
    chain per backend, an `old_` map): the first apply of the new driver leaves exactly the new
    format, with every bucket planned, and keeps the pins."""
    nft = NamespaceNft(netns)
    t = "netdev lbagent"
    old = [f"add table {t}",
           f"add map {t} pins_tcp {{ type ipv4_addr . ipv4_addr . inet_service . inet_service : ether_addr; "
           "size 1048576; flags timeout; }",
           f"add element {t} pins_tcp {{ 10.9.9.9 . 203.0.113.1 . 40000 . 80 timeout 600s "
           ": 02:00:00:01:00:01 }",
           f"add map {t} cur_1 {{ type mark : verdict; size 131072; }}",
           f"add map {t} old_1 {{ type mark : verdict; size 131072; }}",
           f"add set {t} unstable_1 {{ type mark; size 131072; }}",
           f"add counter {t} cb1_10_1_0_1", f"add counter {t} newflows1",
           f"add chain {t} b1_10_1_0_1",
           f"add rule {t} b1_10_1_0_1 meta mark @unstable_1 counter name newflows1",
           f"add rule {t} b1_10_1_0_1 counter name cb1_10_1_0_1 ether daddr set 02:00:00:01:00:01 "
           'fwd to "eth0"',
           f"add chain {t} l1", f"add rule {t} l1 meta mark vmap @cur_1",
           f"add element {t} cur_1 {{ 0 : jump b1_10_1_0_1 }}"]
    nft.run("\n".join(old) + "\n")
    plan = _plan(1, 409, 4)
    NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft, nflog_group=5).apply([plan])
    objects = _objects(nft)
    assert ("chain", "b1_10_1_0_1") not in objects
    assert ("map", "old_1") not in objects
    assert ("map", "cur_1") not in objects
    assert ("set", "unstable_1") not in objects
    assert _hash_rule(nft, 1)[0] == 409
    assert _mine(nft, "cur", 1) == _planned_cur(plan)
    assert len(_elements(nft, "map", "pins_tcp")) == 1, "the pins survive the upgrade"


@pytest.mark.lab
def test_the_per_listener_sets_format_is_replaced_at_the_first_apply(netns):
    """A mux upgraded from four sets per listener (`cur_<id>`, `unstable_<id>`, `pinok_<id>`,
    `cnt_<id>`, the format before the shared sets), mid-transition: the first apply fills the
    shared sets, moves the rules to them, deletes every per-listener set, keeps the pins and
    the backend counters, and each listener then holds exactly its plan."""
    nft = NamespaceNft(netns)
    t = "netdev lbagent"
    old = [f"add table {t}",
           f"add map {t} pins_tcp {{ type ipv4_addr . ipv4_addr . inet_service . inet_service : ether_addr; "
           "size 1048576; flags timeout; }",
           f"add element {t} pins_tcp {{ 10.9.9.9 . 203.0.113.1 . 40000 . 80 timeout 600s "
           ": 02:00:00:01:00:01 }"]
    for lid in (1, 2):
        old += [f"add map {t} cur_{lid} {{ type mark : ether_addr; size 409; }}",
                f"add set {t} unstable_{lid} {{ type mark; }}",
                f"add set {t} pinok_{lid} {{ type ether_addr; }}",
                f"add map {t} cnt_{lid} {{ type ether_addr : counter; }}",
                f"add counter {t} cb{lid}_10_{lid}_0_1", f"add counter {t} l{lid}",
                f"add element {t} cur_{lid} {{ 0 : 02:00:00:0{lid}:00:01, 1 : 02:00:00:0{lid}:00:01 }}",
                f"add element {t} unstable_{lid} {{ 1 }}",
                f"add element {t} pinok_{lid} {{ 02:00:00:0{lid}:00:01 }}",
                f'add element {t} cnt_{lid} {{ 02:00:00:0{lid}:00:01 : "cb{lid}_10_{lid}_0_1" }}',
                f"add chain {t} l{lid}", f"add rule {t} l{lid} counter name l{lid}",
                f"add rule {t} l{lid} meta mark @unstable_{lid} ether daddr @pinok_{lid} accept",
                f"add rule {t} l{lid} ether daddr set meta mark map @cur_{lid} "
                f'counter name ether daddr map @cnt_{lid} fwd to "eth0"']
    nft.run("\n".join(old) + "\n")
    plans = [_plan(1, 409, 4), _plan(2, 409, 4)]
    NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft, nflog_group=5).apply(plans)
    objects = _objects(nft)
    left = sorted(name for kind, name in objects if kind in ("map", "set") and re.fullmatch(r"\w+_\d+", name))
    assert left == [], f"per-listener sets left: {left}"
    assert ("counter", "cb1_10_1_0_1") in objects, "a planned backend's counter is kept"
    for plan in plans:
        assert _mine(nft, "cur", plan.listener_id) == _planned_cur(plan)
        assert _mine(nft, "unstable", plan.listener_id) == {}
        assert _mine(nft, "cnt", plan.listener_id) == {
            mac: f"cb{plan.listener_id}_{a.replace('.', '_')}" for a, mac in plan.backends}
    assert len(_elements(nft, "map", "pins_tcp")) == 1, "the pins survive the upgrade"


@pytest.mark.lab
def test_a_refused_netlink_batch_names_the_set_and_applies_nothing(netns):
    """One batch is one transaction: a delete of a missing element fails the whole batch (the
    add before it is rolled back) with an error naming the set; a 65,537-bucket transition (over
    60 messages) is acknowledged without overflowing the socket."""
    cli = NamespaceNft(netns)
    size = 65537
    first = _plan(1, size, 8)
    drained = ListenerPlan(1, first.vip, "tcp", 80, first.backends, _plan(1, size, 7).current,
                           first.current, np.flatnonzero(_plan(1, size, 7).current != first.current),
                           pin_timeout_s=60)

    def work() -> str:
        dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nflog_group=5)
        dp.apply([first])
        sent = dp.netlink_transactions
        dp.apply([drained])
        assert dp.netlink_transactions == sent + 1
        bad = [Op("add", "unstable_a", np.array([70001])), Op("delete", "unstable_a", np.array([70000]))]
        with pytest.raises(NetlinkError, match="delete elements of unstable_a: No such file") as excinfo:
            NetlinkElements().run("lbagent", bad)
        return str(excinfo.value)

    _in_netns(netns, work)
    assert _mine(cli, "cur", 1) == _planned_cur(drained)
    assert 70001 not in _elements(cli, "set", "unstable_a")


@pytest.mark.lab
def test_a_new_table_size_rewrites_hash_and_table_in_one_transaction(netns):
    """The same driver, a listener's table size changed (its backend cap grew) and a backend
    gone: its hash and its table change in one transaction (no element of the old size is
    left), the gone backend's counter is deleted, its neighbour is untouched."""
    nft = NamespaceNft(netns)
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft)
    dp.apply([_plan(1, 409, 5), _plan(2, 409, 4)])
    neighbour = _mine(nft, "cur", 2)
    sent = dp.transactions
    dp.apply([_plan(1, 809, 4), _plan(2, 409, 4)])
    assert dp.transactions == sent + 1
    assert _hash_rule(nft, 1) == (809, 0)
    assert _mine(nft, "cur", 1) == _planned_cur(_plan(1, 809, 4))
    assert ("counter", "cb1_10_1_0_5") not in _objects(nft)
    assert "02:00:00:01:00:05" not in _mine(nft, "cnt", 1)
    assert _mine(nft, "cur", 2) == neighbour
    dp.apply([_plan(1, 211, 4), _plan(2, 409, 4)])  # and smaller: buckets 211.. leave
    assert _mine(nft, "cur", 1) == _planned_cur(_plan(1, 211, 4))
    assert _mine(nft, "cur", 2) == neighbour


def _plan6(lid: int, size: int, count: int, old: np.ndarray | None = None) -> ListenerPlan:
    current = maglev_table([f"b{i}" for i in range(count)], None, size)
    unstable = None if old is None else np.flatnonzero(current != old)
    backends = tuple((f"fd00:{lid:x}::{i + 1:x}", f"02:00:00:{lid:02x}:00:{i + 1:02x}") for i in range(count))
    return ListenerPlan(lid, f"2001:db8:113::{lid:x}", "tcp", 80, backends, current, old, unstable,
                        pin_timeout_s=60)


@pytest.mark.lab
def test_ipv6_listeners_share_the_format_and_go_as_netlink_messages(netns):
    """IPv6 listeners beside IPv4 ones through the daemon's driver: the kernel takes their rules
    (ip6 hash, fingerprint-keyed pins, the SYN rule, learning, the injection chain), their
    dispatch entries land in `dispatch6` over netlink (24-byte keys), a transition of an IPv6
    listener is elements only, and removing one deletes its entry and objects."""
    cli = NamespaceNft(netns)
    v4, v6 = _plan(1, 409, 4), _plan6(2, 409, 4)
    dp = _in_netns(netns, lambda: NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nflog_group=5,
                                               learn=True, inject_iface="eth1"))
    _in_netns(netns, lambda: dp.apply([v4, v6]))
    assert _mine(cli, "cur", 2) == _planned_cur(v6)
    dispatch6 = _elements(cli, "map", "dispatch6")
    assert [(json.loads(k)["concat"], v["jump"]["target"]) for k, v in dispatch6.items()] == [
        (["2001:db8:113::2", "tcp", 80], "l2")]
    assert [v["jump"]["target"] for v in _elements(cli, "map", "dispatch").values()] == ["l1"]
    objects = _objects(cli)
    assert {("map", "pins6_tcp"), ("map", "pins6_udp"), ("map", "learn2")} <= objects
    rules = cli.run("list chain netdev lbagent l2")
    assert "jhash ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport mod 409 seed" in rules
    handles = _handles(cli, 2)

    grown = _plan6(2, 409, 5, old=v6.current)
    sent, by_netlink = dp.transactions, dp.netlink_transactions
    _in_netns(netns, lambda: dp.apply([v4, grown]))
    assert (dp.transactions, dp.netlink_transactions) == (sent + 1, by_netlink + 1)
    assert _handles(cli, 2) == handles, "a new IPv6 backend rewrote the listener's rules"
    assert _mine(cli, "cur", 2) == _planned_cur(grown)
    assert sorted(_mine(cli, "unstable", 2)) == grown.unstable.tolist()

    _in_netns(netns, lambda: dp.apply([v4]))
    assert _elements(cli, "map", "dispatch6") == {}
    assert [o for o in _objects(cli) if o[1] in {"l2", "learn2", "pinned2"}] == []
    # only listener 1's (slot 0) elements are left in the shared sets
    assert {int(k) >> 17 for k in _elements(cli, "map", "cur_a")} == {0}
    assert {json.loads(k)["concat"][0] for k in _elements(cli, "map", "cnt_a")} == {0}


@pytest.mark.lab
def test_many_ipv6_dispatch_elements_go_in_messages_the_kernel_takes(netns):
    """1,500 IPv6 dispatch entries (about 70 bytes each with their verdict: 1,000 of them would
    overflow a netlink attribute's 16-bit length) in one netlink batch all land."""
    cli = NamespaceNft(netns)
    cli.run("add table netdev lbagent\nadd chain netdev lbagent l1\n"
            "add map netdev lbagent dispatch6 { type ipv6_addr . inet_proto . inet_service : verdict; }\n")
    keys = [(str(ipaddress.IPv6Address("2001:db8::1") + (i << 16)), "tcp", 80) for i in range(1500)]
    op = Op("add", "dispatch6", keys, ["jump l1"] * len(keys), "dispatch", "verdict")
    assert len(op.messages("lbagent")) >= 2
    _in_netns(netns, lambda: NetlinkElements().run("lbagent", [op]))
    landed = {tuple(json.loads(k)["concat"]) for k in _elements(cli, "map", "dispatch6")}
    assert landed == {(vip, "tcp", 80) for vip, _, _ in keys}


@pytest.mark.lab
def test_an_ipv6_syn_whose_pin_cannot_be_added_is_still_forwarded(netns, monkeypatch):
    """The IPv6 SYN rule loads the address fingerprint into the mark (overwriting the bucket) and
    forwards the SYN itself; when its pin `add` fails (the pin map is full) the rule after it
    forwards the SYN to the backend the current table gave it. A pin map of one element here:
    the first SYN is pinned, the second is not, both reach their backend."""
    mux_mac, client_mac = "02:aa:00:00:00:01", "02:cc:00:00:00:01"
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "address", mux_mac], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth1", "up"], check=True)
    monkeypatch.setattr(nft_module, "PIN_MAP_SIZE", 1)
    cli = NamespaceNft(netns)
    plan = _plan6(3, 11, 2)
    everything = np.arange(11)
    plan = ListenerPlan(3, plan.vip, "tcp", 80, plan.backends, plan.current, plan.current[::-1].copy(),
                        everything, pin_timeout_s=60)  # every bucket unstable: every SYN takes rule 3
    NftDataplane("eth0", mux_mac, seed=7, nft=cli, nflog_group=5).apply([plan])

    vip = ipaddress.IPv6Address(plan.vip)

    def backend_of(saddr: str, sport: int) -> int:
        return int(plan.current[flow_bucket(saddr, plan.vip, 6, sport, 80, seed=7, table_size=11)])

    # two flows the table gives different backends (the second SYN's MAC comes from its own bucket)
    first = backend_of("fd00:99::1", 40001)
    second = next(p for p in range(40002, 41000) if backend_of("fd00:99::2", p) != first)
    flows = [("fd00:99::1", 40001), ("fd00:99::2", second)]

    mux_raw = bytes.fromhex(mux_mac.replace(":", ""))

    def frame(saddr: str, sport: int) -> bytes:
        eth = mux_raw + bytes.fromhex(client_mac.replace(":", "")) + b"\x86\xdd"
        ip6 = struct.pack("!IHBB16s16s", 0x60000000, 20, 6, 64, ipaddress.IPv6Address(saddr).packed,
                          vip.packed)
        return eth + ip6 + struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)

    def exchange() -> dict[int, str]:
        """Send the SYNs into eth0 (through its peer eth1) and read what eth0 forwards back out:
        source port -> destination MAC of each forwarded SYN."""
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        rx.bind(("eth1", 0))
        rx.settimeout(0.2)
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind(("eth1", 0))
        seen: dict[int, str] = {}
        try:
            for saddr, sport in flows:
                tx.send(frame(saddr, sport))
            deadline = time.monotonic() + 60
            while len(seen) < len(flows) and time.monotonic() < deadline:
                try:
                    data = rx.recv(2048)
                except TimeoutError:
                    continue
                # forwarded by the mux: its source MAC, an IPv6 TCP segment to port 80
                if data[6:12] == mux_raw and data[20] == 6 and len(data) >= 58:
                    sport, dport = struct.unpack_from("!HH", data, 54)
                    if dport == 80:
                        seen[sport] = data[0:6].hex(":")
        finally:
            rx.close()
            tx.close()
        return seen

    forwarded = _in_netns(netns, exchange)
    expected = {sport: plan.backends[backend_of(saddr, sport)][1] for saddr, sport in flows}
    assert forwarded == expected, f"forwarded SYNs (sport -> MAC) {forwarded}, the table says {expected}"
    assert len(_elements(cli, "map", "pins6_tcp")) == 1, "the pin map holds one element: one add failed"


@pytest.mark.lab
def test_a_listener_changing_address_family_gets_rules_and_learn_map_of_its_family(netns):
    """A listener id moved from an IPv4 VIP to an IPv6 one (and back): its rules are re-rendered
    for the family and, with learning, its learn map recreated with the family's key, by the same
    driver and by a restarted one (which finds the other family's map in the kernel)."""
    cli = NamespaceNft(netns)

    def learn_key() -> list[str]:
        listing = json.loads(cli.run("list map netdev lbagent learn4", json_output=True))
        return next(item["map"]["type"] for item in listing["nftables"] if "map" in item)

    v4 = _plan(4, 409, 4)
    v6 = ListenerPlan(4, "2001:db8:113::4", "tcp", 80, _plan6(4, 409, 4).backends, v4.current,
                      pin_timeout_s=60)
    NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=cli, learn=True, nflog_group=5).apply([v4])
    assert learn_key() == ["ipv4_addr", "ipv4_addr", "inet_service", "inet_service"]
    restarted = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=cli, learn=True, nflog_group=5)
    restarted.apply([v6])
    assert learn_key() == ["classid", "inet_service", "inet_service"]
    assert "jhash ip6 saddr" in cli.run("list chain netdev lbagent l4")
    assert [json.loads(k)["concat"][0] for k in _elements(cli, "map", "dispatch6")] == ["2001:db8:113::4"]
    assert _elements(cli, "map", "dispatch") == {}
    restarted.apply([v4])
    assert learn_key() == ["ipv4_addr", "ipv4_addr", "inet_service", "inet_service"]
    assert "jhash ip saddr" in cli.run("list chain netdev lbagent l4")
    assert _elements(cli, "map", "dispatch6") == {}
    assert _mine(cli, "cur", 4) == _planned_cur(v4)


# -- the daemon: a change to one VIP among many plans and writes that VIP only ------------------

DAEMON_VIPS = 40


def _daemon_document(generation: int, changed: dict[int, int], deadline: float = 0.0) -> dict:
    """DAEMON_VIPS VIPs x 2 TCP listeners x 4 backends (MACs given: nothing to resolve).
    `changed`: listener id -> generation; such a listener's fourth backend is replaced by a fifth
    host, the four of generation 1 draining as its `previous` until `deadline`."""
    def backend(vip: int, host: int) -> dict:
        return {"address": f"10.20.{vip}.{host}", "port": 80, "mac": f"02:00:00:20:{vip:02x}:{host:02x}"}

    vips = []
    for v in range(DAEMON_VIPS):
        listeners = []
        for k, port in enumerate((80, 443)):
            lid = 1 + 2 * v + k
            hosts = [1, 2, 3, 4]
            previous = None
            if lid in changed:
                hosts = [1, 2, 3, 5]
                previous = {"generation": changed[lid] - 1, "backends": [backend(v, h) for h in (1, 2, 3, 4)],
                            "drain_deadline": deadline}
            listeners.append({"id": lid, "protocol": "tcp", "port": port, "generation": changed.get(lid, 1),
                              "backends": [backend(v, h) for h in hosts], "previous": previous})
        vips.append({"address": f"203.0.113.{v + 1}", "listeners": listeners})
    return {"version": 1, "generation": generation, "node": "mux-1",
            "cluster": {"hash_seed": 7, "table_size": 251, "owner_seed": 9, "max_records": 10000,
                        "muxes": [{"name": "mux-1", "address": "10.20.255.1", "peer_port": 7070}],
                        "peer_key": "00" * 16, "redirect_key": "11" * 16},
            "vips": vips}


def test_the_daemon_plans_and_writes_only_the_vip_a_change_touches(netns, tmp_path):
    """One backend replaced on one listener of 40 VIPs: the daemon plans that VIP alone (its
    other VIPs keep their plans), the kernel driver writes that listener alone, and the kernel
    holds the new backend. The daemon's own counters say so (/metrics)."""
    from lbagent.metrics import parse as parse_metrics
    from tests.services import wait_until

    need_binary("curl")
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    config = tmp_path / "state.json"
    config.write_text(json.dumps(_daemon_document(1, {})))
    run_dir = tmp_path / "run"
    port = 19000 + os.getpid() % 1000
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "lbagent.daemon",
                             "--config", str(config), "--iface", "eth0", "--run-dir", str(run_dir),
                             "--metrics", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

    def metrics() -> dict[str, float]:
        out = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sf",
                              f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True,
                             check=False).stdout
        return {name: value for (name, labels), value in parse_metrics(out or "").items() if not labels}

    def at_generation(generation: int):
        def check():
            m = metrics()
            return m if m.get("lbagent_config_generation") == generation else None
        return check

    try:
        loaded = wait_until(at_generation(1), timeout_s=120, what="the daemon to apply generation 1 "
                            f"(log: {tmp_path / 'daemon.log'})")
        assert loaded["lbagent_vips_planned_total"] == DAEMON_VIPS
        assert loaded["lbagent_last_apply_listeners_written"] == 2 * DAEMON_VIPS

        changed_lid = 2 * 17 + 2  # VIP 17's second listener
        deadline = time.time() + 600
        config.write_text(json.dumps(_daemon_document(2, {changed_lid: 2}, deadline)))
        after = wait_until(at_generation(2), timeout_s=120, what="the daemon to apply generation 2")
        assert after["lbagent_vips_planned_total"] - loaded["lbagent_vips_planned_total"] == 1
        assert after["lbagent_last_apply_listeners_written"] == 1

        # The change is in the kernel: the listener's current table names the new host's MAC;
        # its neighbour on the same VIP still has the four hosts of generation 1.
        def macs_of(lid: int) -> set[str]:
            return set(_mine(NamespaceNft(netns), "cur", lid).values())

        assert macs_of(changed_lid) == {f"02:00:00:20:11:{h:02x}" for h in (1, 2, 3, 5)}
        assert macs_of(changed_lid - 1) == {f"02:00:00:20:11:{h:02x}" for h in (1, 2, 3, 4)}

        # Nothing changed: a new document number with the same content plans nothing again.
        config.write_text(json.dumps(_daemon_document(3, {changed_lid: 2}, deadline)))
        again = wait_until(at_generation(3), timeout_s=120, what="the daemon to apply generation 3")
        assert again["lbagent_vips_planned_total"] == after["lbagent_vips_planned_total"]
        assert again["lbagent_last_apply_listeners_written"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
