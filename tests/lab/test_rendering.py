"""What the kernel driver, BGP control and metrics produce, checked without root (the lab tests
prove the same text works in a real kernel)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lbagent.bgp import BgpSettings, render_exabgp_conf
from lbagent.dataplane.nft import ListenerPlan, NftDataplane
from lbagent.dataplane.slowpath import iptables_rules
from lbagent.lab.bird import render_bird_conf
from lbagent.metrics import Metric, parse, render


class RecordingNft:
    """Stands in for libnftables only to capture the transaction text (no kernel here)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
        self.sent.append(text)
        return '{"nftables": []}'


def _plan(current: np.ndarray, old: np.ndarray | None = None, *, pin_timeout_s: int = 60,
          pin_macs: tuple[str, ...] = ()) -> ListenerPlan:
    unstable = None if old is None else np.flatnonzero(current != old)
    return ListenerPlan(7, "203.0.113.10", "tcp", 80, (("10.0.0.1", "02:00:00:00:00:01"),
                                                       ("10.0.0.2", "02:00:00:00:00:02")),
                        current, old, unstable, pin_timeout_s=pin_timeout_s, pin_macs=pin_macs)


def test_first_apply_is_one_transaction_with_seed_and_full_tables():
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=24301, table_size=11, nft=nft)
    dp.apply([_plan(np.array([0, 1] * 5 + [0], dtype=np.int32))])
    tx = nft.sent[-1]
    assert dp.transactions == 1
    assert "mod 11 seed 0x5eed" in tx
    # The first listener has slot 0: its keys are its buckets, and slot 0 . MAC.
    assert "add element netdev lbagent cur_a { 0 : 02:00:00:00:00:01, 1 : 02:00:00:00:00:02," in tx
    assert 'add element netdev lbagent cnt_a { 0 . 02:00:00:00:00:01 : "cb7_10_0_0_1", ' in tx
    assert "add counter netdev lbagent cb7_10_0_0_2" in tx
    # The current table is read in one shared chain (the `cur` map has one user: the kernel
    # checks each new element of a map against every rule using it); the listener jumps there,
    # drops a bucket without a backend, counts by slot and MAC and forwards.
    assert "add rule netdev lbagent bucket_a ether daddr set meta mark map @cur_a" in tx
    assert [ln for ln in tx.splitlines() if "map @cur_a" in ln] == [
        "add rule netdev lbagent bucket_a ether daddr set meta mark map @cur_a"]
    chain = [ln for ln in tx.splitlines() if ln.startswith("add rule netdev lbagent l7 ")]
    jump = chain.index("add rule netdev lbagent l7 jump bucket_a")
    assert chain[jump + 1] == "add rule netdev lbagent l7 ether daddr 02:aa:00:00:00:01 drop"
    assert chain[-2] == ('add rule netdev lbagent l7 counter name meta mark & 0xfffe0000 . ether daddr '
                         'map @cnt_a ether saddr set 02:aa:00:00:00:01 fwd to "eth0"')
    assert "mod 11 seed 0x5eed offset 0x0" in tx
    assert "203.0.113.10 . tcp . 80 : jump l7" in tx


def test_no_rule_names_a_backend_and_only_dispatch_holds_verdicts():
    """The table format: backends are map elements (bucket -> MAC, MAC -> counter), never
    chains or rules, so a backend change cannot need a rule; the dispatch maps (`dispatch`, and
    `dispatch6` for IPv6 VIPs) are the only verdict maps (no jump graph behind `cur_` for the
    kernel to re-validate). The shared sets are the table's first sets."""
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, table_size=11, nft=nft, nflog_group=9)
    dp.apply([_plan(np.array([0, 1] * 5 + [0], dtype=np.int32))])
    lines = nft.sent[-1].splitlines()
    assert [ln for ln in lines if "02:00:00:00:00:0" in ln and ln.startswith("add rule")] == []
    assert [ln for ln in lines if ln.startswith("add chain")] == [
        "add chain netdev lbagent bucket_a",
        'add chain netdev lbagent ingress { type filter hook ingress device "eth0" priority 0; '
        "policy accept; }", "add chain netdev lbagent l7"]
    verdict_maps = [ln for ln in lines if ln.startswith("add map") and ": verdict" in ln]
    assert [ln.split()[4] for ln in verdict_maps] == ["dispatch", "dispatch6"]
    sets = [ln.split()[4] for ln in lines if ln.startswith(("add map", "add set"))]
    assert sets[:4] == ["cur_a", "unstable_a", "cnt_a", "pinok_a"], sets


def test_second_apply_sends_only_changed_buckets():
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, table_size=11, nft=nft)
    before = np.array([0] * 11, dtype=np.int32)
    after = before.copy()
    after[[3, 9]] = 1
    first = ListenerPlan(5, "203.0.113.5", "tcp", 80, (("10.0.0.1", "02:00:00:00:00:01"),), before)
    dp.apply([first, _plan(before)])
    assert dp.slot_of(7) == 1
    assert "mod 11 seed 0x1 offset 0x20000" in nft.sent[-1], "the hash puts the slot above the bucket"
    dp.apply([first, _plan(after, old=before)])
    tx = nft.sent[-1]
    # slot 1: keys 1 << 17 | bucket
    assert "delete element netdev lbagent cur_a { 131075, 131081 }" in tx
    assert "add element netdev lbagent cur_a { 131075 : 02:00:00:00:00:02, 131081 : 02:00:00:00:00:02 }" in tx
    assert "add element netdev lbagent unstable_a { 131075, 131081 }" in tx
    assert "add rule" not in tx


class RecordingElements:
    """Stands in for the netlink writer only to capture what a change sends (no kernel here;
    tests/lab/test_incremental.py sends the same to a real one)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def run(self, table: str, ops) -> None:
        self.batches.append([op.text(f"netdev {table}") for op in ops])


def test_adding_draining_and_removing_a_backend_send_no_rule():
    """With the netlink writer, a backend added (its counter, its MAC's counter element, its
    buckets), drained and removed is one element batch each and no libnftables transaction."""
    nft, elements = RecordingNft(), RecordingElements()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=nft, elements=elements, nflog_group=9)
    two = (("10.0.0.1", "02:00:00:00:00:01"), ("10.0.0.2", "02:00:00:00:00:02"))
    three = (*two, ("10.0.0.3", "02:00:00:00:00:03"))
    first = np.array([0, 1] * 5 + [0], dtype=np.int32)
    others = [ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, two, first) for lid in (1, 2)]
    dp.apply([*others, ListenerPlan(7, "203.0.113.10", "tcp", 80, two, first,
                                    pin_macs=tuple(m for _, m in two))])
    assert dp.slot_of(7) == 2
    text_sent, batches = len(nft.sent), len(elements.batches)
    grown = first.copy()
    grown[[2, 5]] = 2
    dp.apply([*others, ListenerPlan(7, "203.0.113.10", "tcp", 80, three, grown, first, np.array([2, 5]),
                                    pin_macs=tuple(m for _, m in three))])
    assert len(nft.sent) == text_sent, "adding a backend went through libnftables"
    assert len(elements.batches) == batches + 1
    batch = elements.batches[-1]
    # slot 2: keys 2 << 17 | bucket = 262144 + bucket, and 262144 . MAC
    assert batch.index("add counter netdev lbagent cb7_10_0_0_3") < batch.index(
        'add element netdev lbagent cnt_a { 262144 . 02:00:00:00:00:03 : "cb7_10_0_0_3" }')
    assert "add element netdev lbagent pinok_a { 262144 . 02:00:00:00:00:03 }" in batch
    assert "delete element netdev lbagent cur_a { 262146, 262149 }" in batch
    assert ("add element netdev lbagent cur_a { 262146 : 02:00:00:00:00:03, 262149 : 02:00:00:00:00:03 }"
            in batch)
    assert "add element netdev lbagent unstable_a { 262146, 262149 }" in batch
    assert [ln for ln in batch if "flush" in ln] == [], "a shared set is never flushed for one listener"
    # The third backend removed (its deadline passed): its buckets, its counter element, then
    # its counter (an element references it), in one batch.
    dp.apply([*others, ListenerPlan(7, "203.0.113.10", "tcp", 80, two, first)])
    assert len(nft.sent) == text_sent
    batch = elements.batches[-1]
    assert batch.index("delete element netdev lbagent cnt_a { 262144 . 02:00:00:00:00:03 }") < batch.index(
        "delete counter netdev lbagent cb7_10_0_0_3")
    assert ("delete element netdev lbagent pinok_a { 262144 . 02:00:00:00:00:01, "
            "262144 . 02:00:00:00:00:02, 262144 . 02:00:00:00:00:03 }") in batch
    assert ("add element netdev lbagent cur_a { 262146 : 02:00:00:00:00:01, 262149 : 02:00:00:00:00:02 }"
            in batch)


def test_bad_plans_are_refused_with_the_reason():
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, table_size=11, nft=RecordingNft())
    with pytest.raises(ValueError, match="old table has 5 buckets, current 11"):
        ListenerPlan(7, "203.0.113.10", "tcp", 80, (), np.zeros(11, dtype=np.int32),
                     np.zeros(5, dtype=np.int32), np.array([], dtype=np.int64))
    other = ListenerPlan(8, "203.0.113.10", "tcp", 80, (), np.zeros(11, dtype=np.int32))
    with pytest.raises(ValueError, match=r"share address, protocol and port 203\.0\.113\.10 tcp 80"):
        dp.apply([_plan(np.zeros(11, dtype=np.int32)), other])
    with pytest.raises(ValueError, match="protocol 'sctp'"):
        ListenerPlan(1, "203.0.113.1", "sctp", 80, (), np.zeros(11, dtype=np.int32))
    with pytest.raises(ValueError, match=r"backend 10\.0\.0\.9 has MAC '02:00:00:00:00'"):
        ListenerPlan(1, "203.0.113.1", "tcp", 80, (("10.0.0.9", "02:00:00:00:00"),),
                     np.zeros(11, dtype=np.int32))
    with pytest.raises(ValueError, match="seed"):
        NftDataplane("eth0", "02:aa:00:00:00:01", seed=2**32, table_size=11, nft=RecordingNft())


def test_exabgp_and_bird_configs_name_both_ends(tmp_path: Path):
    conf = render_exabgp_conf(BgpSettings("10.90.0.1", "10.90.0.11", 65001, 65000), tmp_path)
    assert "neighbor 10.90.0.1 {" in conf
    assert "local-as 65001;" in conf
    assert "peer-as 65000;" in conf
    assert str(tmp_path / "exabgp-commands.py") in conf
    bird = render_bird_conf("10.90.0.1", ["10.90.0.11", "10.90.0.12"], "/tmp/bird.log")
    assert "merge paths on;" in bird
    assert "neighbor 10.90.0.12 as 65001;" in bird
    with pytest.raises(ValueError, match="AS number"):
        BgpSettings("10.90.0.1", "10.90.0.11", 0, 65000)


def test_iptables_rules_queue_each_listener_with_bypass():
    text = iptables_rules([("203.0.113.10", "tcp", 80)], 7)
    assert ("-A LBAGENT_SLOWPATH -d 203.0.113.10/32 -p tcp --dport 80 "
            "-j NFQUEUE --queue-num 7 --queue-bypass") in text
    assert text.startswith("*mangle\n")
    assert text.endswith("COMMIT\n")


def test_metrics_text_round_trips():
    packets = Metric("lbagent_backend_packets_total", "x", "counter").add(5, listener="7", backend="10.0.0.1")
    text = render([packets, Metric("lbagent_flow_records", "y").add(0)])
    assert "# TYPE lbagent_backend_packets_total counter" in text
    samples = parse(text)
    assert samples[("lbagent_flow_records", frozenset())] == 0
    labels = frozenset({("listener", "7"), ("backend", "10.0.0.1")})
    assert samples[("lbagent_backend_packets_total", labels)] == 5


def test_syns_of_unstable_buckets_are_pinned_logged_and_forwarded_by_the_kernel():
    """Rule 3's SYN case compiled: in the listener chain, a SYN of an unstable bucket takes the
    current table's backend MAC, is reported to nfnetlink_log, pinned to that MAC and counted;
    only non-SYN unknown packets go up to NFQUEUE. UDP (no SYN) keeps queueing all."""
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=24301, table_size=11, nft=nft, nflog_group=9)
    current = np.array([0, 1] * 5 + [0], dtype=np.int32)
    zeros = np.zeros(11, dtype=np.int32)
    udp = ListenerPlan(8, "203.0.113.10", "udp", 53, (("10.0.0.1", "02:00:00:00:00:01"),),
                       zeros, zeros, np.array([], dtype=np.int64), pin_timeout_s=30)
    dp.apply([_plan(current, np.zeros(11, dtype=np.int32), pin_timeout_s=125), udp])
    lines = nft.sent[-1].splitlines()

    def chain(name: str) -> list[str]:
        return [ln for ln in lines if ln.startswith(f"add rule netdev lbagent {name} ")]

    listener = chain("l7")
    syn = next(i for i, ln in enumerate(listener) if "== syn" in ln)
    assert ("meta mark @unstable_a tcp flags & (syn | ack) == syn "
            "log group 9 snaplen 40 add @pins_tcp { ip saddr . ip daddr . th sport . th dport timeout 125s "
            ": ether daddr } counter name newflows7") in listener[syn], "report first: never lost"
    slow = next(i for i, ln in enumerate(listener) if "counter name slow7 accept" in ln)
    assert "meta mark @unstable_a tcp flags & (syn | ack) != syn" in listener[slow]
    jump = listener.index("add rule netdev lbagent l7 jump bucket_a")
    no_backend = listener.index("add rule netdev lbagent l7 ether daddr 02:aa:00:00:00:01 drop")
    forward = next(i for i, ln in enumerate(listener) if "map @cnt_a" in ln)
    # the SYN has its backend's MAC from the current table (and none: dropped) when it is
    # reported and pinned; the forwarding rule then sends it
    assert jump + 1 == no_backend < syn < forward
    assert slow < jump
    assert listener[-1].endswith("l7 drop"), "a bucket without a backend is dropped"
    assert [ln for ln in chain("l8") if "== syn" in ln] == [], "UDP has no SYN rule"
    assert any(ln.endswith("meta mark @unstable_a counter name slow8 accept") for ln in chain("l8"))
    assert any("offset 0x20000" in ln for ln in chain("l8")), "listener 8 has slot 1"


def test_pins_are_renewed_by_their_flow_and_forward_only_to_alive_backends():
    """Rule 1: a pin forwards (and its idle timeout is renewed by the packet, in the kernel) only
    when its MAC is one of the listener's alive backends; otherwise the mux's MAC is put back and
    the packet goes on like an unpinned one. The re-injection chain pins with the longest idle
    timeout of the protocol's listeners."""
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, table_size=11, nft=nft,
                      inject_iface="lbinj1")
    dp.apply([_plan(np.zeros(11, dtype=np.int32), pin_timeout_s=7440, pin_macs=("02:00:00:00:00:01",))])
    lines = nft.sent[-1].splitlines()
    listener = [ln for ln in lines if ln.startswith("add rule netdev lbagent l7 ")]
    pin = next(i for i, ln in enumerate(listener) if "map @pins_tcp" in ln)
    assert ("map @pins_tcp meta mark set 0x0 meta mark . ether daddr @pinok_a update @pins_tcp { ip saddr . "
            "ip daddr . th sport . th dport timeout 7440s : ether daddr }") in listener[pin]
    assert listener[pin + 1].endswith("ether daddr set 02:aa:00:00:00:01"), "the mux's MAC is restored"
    assert "add element netdev lbagent pinok_a { 0 . 02:00:00:00:00:01 }" in lines
    inject = [ln for ln in lines if ln.startswith("add rule netdev lbagent inject ") and "tcp" in ln]
    assert "timeout 7440s : ether daddr" in inject[0]


def test_the_shared_sets_have_no_size_and_each_hash_its_listeners_table_size():
    """The shared sets (cur, unstable, cnt, pinok) are declared once, without a size (a
    resizable hash: a declared size would also cap the elements of every listener together);
    each listener's hash has its own table size (`mod`) and slot (`offset`)."""
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=nft)
    small = ListenerPlan(3, "203.0.113.3", "udp", 53, (("10.0.0.1", "02:00:00:00:00:01"),),
                         np.zeros(6421, dtype=np.int32))
    dp.apply([_plan(np.zeros(11, dtype=np.int32)), small])
    lines = nft.sent[-1].splitlines()
    assert "add map netdev lbagent cur_a { type mark : ether_addr; }" in lines
    assert "add set netdev lbagent unstable_a { type mark; }" in lines
    assert "add set netdev lbagent pinok_a { type mark . ether_addr; }" in lines
    assert "add map netdev lbagent cnt_a { type mark . ether_addr : counter; }" in lines
    assert not [ln for ln in lines if ln.startswith(("add map", "add set")) and ("_7" in ln or "_3" in ln)], \
        "no set of a listener's own"
    assert not [ln for ln in lines if "old_" in ln], "no rule reads an old table: the kernel holds none"
    hashes = {ln.split()[4]: ln for ln in lines if "jhash" in ln}
    assert hashes["l3"].endswith("mod 6421 seed 0x1 offset 0x20000")
    assert hashes["l7"].endswith("mod 11 seed 0x1 offset 0x0")


def test_a_table_larger_than_the_marks_bucket_field_is_refused():
    with pytest.raises(ValueError, match="131072"):
        ListenerPlan(1, "203.0.113.1", "tcp", 80, (), np.zeros(131073, dtype=np.int32))
    ListenerPlan(1, "203.0.113.1", "tcp", 80, (), np.zeros(131071, dtype=np.int32))


def test_a_change_sends_only_that_listeners_changes():
    """Incremental: an apply with nothing changed sends nothing; a backend added to one listener
    sends its changed buckets, unstable set and chains, and names no other listener."""
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=1, nft=nft)
    others = [ListenerPlan(lid, f"203.0.113.{lid}", "tcp", 80, (("10.0.0.1", "02:00:00:00:00:01"),),
                           np.zeros(11, dtype=np.int32)) for lid in range(20, 30)]
    before = np.array([0] * 11, dtype=np.int32)
    dp.apply([_plan(before), *others])
    sent = len(nft.sent)
    dp.apply([_plan(before.copy()), *others])  # equal tables, new arrays
    assert len(nft.sent) == sent, "an apply without a change sent a transaction"
    after = before.copy()
    after[[3, 9]] = 1
    dp.apply([_plan(after, old=before), *others])
    tx = nft.sent[-1]
    assert len(nft.sent) == sent + 1
    assert "cur_a" in tx
    slots = {dp.slot_of(lid) for lid in range(20, 30)}
    assert dp.slot_of(7) not in slots
    keys = {int(k) >> 17 for ln in tx.splitlines() if "element" in ln
            for k in re.findall(r"[{,] (\d+)", ln)}
    assert keys == {dp.slot_of(7)}, "an element of another listener's slot was sent"
    for lid in range(20, 30):
        assert f"l{lid} " not in tx, tx
        assert f"cb{lid}_" not in tx, tx
    assert "flush chain netdev lbagent ingress" not in tx, "the dispatch rule is not rebuilt"
    assert "dispatch" not in tx, "no listener was added or removed"
