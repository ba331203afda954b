"""IPv6 pieces that need no kernel: the table text an IPv6 listener renders, new-flow reports and
slow-path packets parsed with 128-bit addresses, and IPv6 flows in packed peer record batches.
The lab test tests/lab/test_ipv6.py runs all of it for real."""

from __future__ import annotations

import ipaddress
import socket
import struct

import numpy as np
import pytest

from lbagent.core.flowhash import ipv6_fingerprint, ipv6_fingerprint_seeds
from lbagent.dataplane.nflog import _PACKET_TYPE, NflogReader, _nla
from lbagent.dataplane.nft import ListenerPlan, NftDataplane
from lbagent.dataplane.slowpath import ip_header, iptables_rules
from lbagent.peer import MAX_DATAGRAM, RecordBatch, ReplicatedRecord

VIP6 = "2001:db8:113::10"
CLIENT6 = "fd00:91:1::2"


class RecordingNft:
    """Stands in for libnftables only to capture the transaction text (no kernel here)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
        self.sent.append(text)
        return '{"nftables": []}'


def _plan(lid: int, vip: str, backends: tuple[tuple[str, str], ...]) -> ListenerPlan:
    return ListenerPlan(lid, vip, "tcp", 80, backends, np.array([0, 1] * 5 + [0], dtype=np.int32))


def test_an_ipv6_listener_renders_ip6_rules_beside_an_ipv4_one():
    nft = RecordingNft()
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=24301, nft=nft, nflog_group=7, learn=True,
                      inject_iface="lbinj1")
    v4 = (("10.0.0.1", "02:00:00:00:00:01"), ("10.0.0.2", "02:00:00:00:00:02"))
    v6 = (("fd00:90::21", "02:00:00:00:00:21"), ("fd00:90::22", "02:00:00:00:00:22"))
    dp.apply([_plan(4, "203.0.113.10", v4), _plan(6, VIP6, v6)])
    tx = nft.sent[-1]
    a, b = ipv6_fingerprint_seeds(24301)
    assert "add element netdev lbagent dispatch { 203.0.113.10 . tcp . 80 : jump l4 }" in tx
    assert f"add element netdev lbagent dispatch6 {{ {VIP6} . tcp . 80 : jump l6 }}" in tx
    assert "ip6 daddr . meta l4proto . th dport vmap @dispatch6" in tx
    assert "jhash ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport mod 11 seed 0x5eed" in tx
    assert "jhash ip saddr . ip daddr . ip protocol . th sport . th dport mod 11 seed 0x5eed" in tx
    # IPv6 pins: the address fingerprint (mark . priority) and the ports; IPv4 ones unchanged
    assert ("add map netdev lbagent pins6_tcp { type mark . classid . inet_service . inet_service "
            ": ether_addr;") in tx
    assert f"meta mark set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {a:#x}" in tx
    assert f"meta priority set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {b:#x}" in tx
    # the pin's backend must be alive for the listener: its slot (listener 4: 0, 6: 1) . MAC in
    # the shared pinok set; IPv6 loads the fingerprint's first half again for the renewal
    assert (f"map @pins6_tcp meta mark set 0x20000 meta mark . ether daddr @pinok_a meta mark set jhash "
            f"ip6 saddr . ip6 daddr mod 4294967295 seed {a:#x} update @pins6_tcp") in tx
    assert "map @pins_tcp meta mark set 0x0 meta mark . ether daddr @pinok_a update @pins_tcp" in tx
    # the SYN rule of the IPv6 listener: 44 bytes reported, pinned under the fingerprint, counted
    # and forwarded by itself (the fingerprint has overwritten the bucket in the mark), the
    # priority back to 0; the IPv4 one pins under the addresses and leaves forwarding to the
    # current-table rule
    rules = tx.splitlines()

    def syn_rule(chain: str) -> str:
        return next(line for line in rules if line.startswith(f"add rule netdev lbagent {chain} ")
                    and "log group" in line)

    v6_syn = syn_rule("l6")
    assert "snaplen 44" in v6_syn
    assert "add @pins6_tcp { meta mark . meta priority . th sport . th dport" in v6_syn
    assert v6_syn.index("log group") < v6_syn.index(f"seed {a:#x}") < v6_syn.index("add @pins6_tcp")
    assert "meta priority set 0" in v6_syn
    assert "counter name meta mark & 0xfffe0000 . ether daddr map @cnt_a" in v6_syn
    assert v6_syn.index("map @cnt_a") < v6_syn.index("log group"), "counted by slot before the fingerprint"
    assert v6_syn.index("ether saddr set 02:aa:00:00:00:01") < v6_syn.index(f"seed {a:#x}"), \
        "the mux's source MAC is set before the add that may fail"
    assert v6_syn.endswith('fwd to "eth0"')
    # if the pin's `add` fails (a full map) the SYN is still forwarded to the backend it was given
    after = rules[rules.index(v6_syn) + 1]
    # (only such a SYN has the mux's source MAC at that point)
    assert after == ("add rule netdev lbagent l6 ether saddr 02:aa:00:00:00:01 meta priority set 0 "
                     'fwd to "eth0"')
    v4_syn = syn_rule("l4")
    assert "snaplen 40" in v4_syn
    assert "add @pins_tcp { ip saddr . ip daddr . th sport . th dport" in v4_syn
    assert "priority" not in v4_syn
    assert "fwd" not in v4_syn
    # no per-backend chain, whatever the family (backends are map elements)
    assert [line for line in rules if "add chain" in line and " b6_" in line] == []
    assert "fd00:90::21" not in tx
    inject6 = [line for line in tx.splitlines() if "inject meta protocol ip6" in line]
    assert len(inject6) == 2
    assert all("@pins6_" in line for line in inject6)
    assert "add map netdev lbagent learn6 { type classid . inet_service . inet_service : mark;" in tx
    assert "add @learn6 { meta priority . th sport . th dport : meta mark & 0x1ffff }" in tx, \
        "the learn maps hold the bucket, not the slot"


def test_the_fingerprint_is_two_seeded_jhashes_of_the_address_pair():
    f1 = ipv6_fingerprint(CLIENT6, VIP6, seed=1)
    assert f1 != ipv6_fingerprint("fd00:91:1::3", VIP6, seed=1)
    assert f1 != ipv6_fingerprint(CLIENT6, VIP6, seed=2)
    assert f1[0] != f1[1]
    assert all(0 <= x < 2**32 - 1 for x in f1)


def _report6(saddr: str, sport: int, seq: int, mark: int) -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, 40, 6, 64, ipaddress.IPv6Address(saddr).packed,
                      ipaddress.IPv6Address(VIP6).packed)
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    attrs = _nla(1, b"\x86\xdd\x00\x00") + _nla(2, struct.pack("!I", mark)) + _nla(12, struct.pack("!I", seq))
    attrs += _nla(9, (ip6 + tcp)[:44])
    body = struct.pack("=BBH", 10, 0, socket.htons(7)) + attrs
    return struct.pack("=IHHII", 16 + len(body), _PACKET_TYPE, 0, 0, 0) + body


def test_ipv6_new_flow_reports_give_128_bit_addresses():
    reader = NflogReader(7, lambda flows: None, copy_range=44)
    batch = _report6(CLIENT6, 40000, 1, 77) + _report6("fd00:91:1::3", 40001, 3, 78)
    flows = reader.parse(batch, len(batch))
    assert flows.dtype == object
    assert flows.tolist() == [
        [int(ipaddress.IPv6Address(CLIENT6)), int(ipaddress.IPv6Address(VIP6)), 6, 40000, 80, 77],
        [int(ipaddress.IPv6Address("fd00:91:1::3")), int(ipaddress.IPv6Address(VIP6)), 6, 40001, 80, 78],
    ]
    assert reader.stats.lost == 1
    assert reader.stats.malformed == 0
    assert reader.copy_range == 44


def test_slow_path_parses_ipv6_and_queues_each_family_with_its_tool():
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, 20, 6, 64, ipaddress.IPv6Address(CLIENT6).packed,
                      ipaddress.IPv6Address(VIP6).packed) + struct.pack("!HH", 40000, 80) + bytes(16)
    assert ip_header(ip6) == (40, 6, int(ipaddress.IPv6Address(CLIENT6)), int(ipaddress.IPv6Address(VIP6)))
    listeners = [("203.0.113.10", "tcp", 80), (VIP6, "tcp", 80)]
    v4, v6 = iptables_rules(listeners, 7), iptables_rules(listeners, 7, ipv6=True)
    assert "-d 203.0.113.10/32 -p tcp --dport 80" in v4
    assert VIP6 not in v4
    assert f"-d {VIP6}/128 -p tcp --dport 80" in v6
    assert "203.0.113.10" not in v6


def test_ipv6_records_travel_packed_with_ipv4_ones():
    s6, d6 = int(ipaddress.IPv6Address(CLIENT6)), int(ipaddress.IPv6Address(VIP6))
    v6 = [ReplicatedRecord(6, (s6 + i, d6, 6, 40000 + i, 80), i, f"web-{i % 3}") for i in range(700)]
    v4 = [ReplicatedRecord(4, (0x0A5B0102, 0xCB00710A, 6, 1000, 80), 5, "web-9")]
    both = RecordBatch.concat([RecordBatch.of(v4), RecordBatch.of(v6)])
    assert list(both) == v4 + v6
    payload = both.take(slice(0, both.per_datagram)).encode()
    assert "rb6" in payload
    assert len(payload["rb6"]) < MAX_DATAGRAM - 1000
    assert list(RecordBatch.decode(payload)) == (v4 + v6)[:both.per_datagram]
    only4 = RecordBatch.of(v4)
    assert "rb" in only4.encode()  # IPv4 only: the 23-byte form older muxes read
    assert list(RecordBatch.decode(only4.encode())) == v4


def test_concatenated_ipv4_batches_keep_network_byte_order():
    v4 = [ReplicatedRecord(4, (0x0A5B0102, 0xCB00710A, 6, 1000, 80), 5, "web-9")]
    only4 = RecordBatch.concat([RecordBatch.of(v4), RecordBatch.of(v4)])
    assert list(RecordBatch.decode(only4.encode())) == v4 + v4


def test_a_plan_whose_vip_is_no_address_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"listener 9: VIP '2001:db8::1::2' is not an IPv4 or IPv6 address"):
        ListenerPlan(9, "2001:db8::1::2", "tcp", 80, (), np.zeros(11, dtype=np.int32))
    with pytest.raises(ValueError, match=r"listener 9: VIP '203.0.113' is not"):
        ListenerPlan(9, "203.0.113", "tcp", 80, (), np.zeros(11, dtype=np.int32))
