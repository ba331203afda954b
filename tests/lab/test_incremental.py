"""A change to one listener touches only that listener's kernel objects (real nftables in a
throwaway namespace): the other listeners' rules keep their handles (a flush and re-add would
renumber them) and their maps keep their elements; each listener's maps are sized to its table."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import numpy as np
import pytest

from lbagent.core.maglev import maglev_table
from lbagent.dataplane.nft import ListenerPlan, NetlinkElements, Nft, NftDataplane, NftError
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
    """Rule handles of every chain of a listener (l<id> and its backend chains)."""
    out = json.loads(nft.run("list chains netdev", json_output=True))
    chains = [c["chain"]["name"] for c in out["nftables"] if "chain" in c
              and (c["chain"]["name"] == f"l{lid}" or c["chain"]["name"].startswith(f"b{lid}_"))]
    handles: dict[str, list[int]] = {}
    for chain in chains:
        listing = json.loads(nft.run(f"list chain netdev lbagent {chain}", json_output=True))
        handles[chain] = [r["rule"]["handle"] for r in listing["nftables"] if "rule" in r]
    return handles


def _map(nft: NamespaceNft, name: str) -> tuple[int | None, list]:
    listing = json.loads(nft.run(f"list map netdev lbagent {name}", json_output=True))
    m = next(item["map"] for item in listing["nftables"] if "map" in item)
    return m.get("size"), sorted(map(str, m.get("elem", [])))


@pytest.mark.lab
def test_a_change_to_one_listener_leaves_the_others_untouched(netns):
    nft = NamespaceNft(netns)
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft, nflog_group=5)
    plans = [_plan(1, 409, 4), _plan(2, 409, 4), _plan(3, 809, 8)]
    dp.apply(plans)
    before = {lid: _handles(nft, lid) for lid in (1, 2, 3)}
    maps_before = {name: _map(nft, name) for name in ("cur_1", "cur_3")}
    assert maps_before["cur_1"][0] == 409, "maps sized to their table"
    assert maps_before["cur_3"][0] == 809, "maps sized to their table"
    assert len(maps_before["cur_3"][1]) == 809
    assert all(len(h) >= 2 for h in before[1].values()), before[1]

    sent = dp.transactions
    # Listener 2 gets a fifth backend: a transition (old table, unstable buckets, a new chain).
    changed = _plan(2, 409, 5, old=plans[1].current)
    dp.apply([plans[0], changed, plans[2]])

    assert dp.transactions == sent + 1, "one change is one transaction"
    assert _handles(nft, 1) == before[1], "listener 1's rules were flushed or re-added"
    assert _handles(nft, 3) == before[3], "listener 3's rules were flushed or re-added"
    assert {name: _map(nft, name) for name in ("cur_1", "cur_3")} == maps_before
    after_2 = _handles(nft, 2)
    assert "b2_10_2_0_5" not in before[2]
    assert "b2_10_2_0_5" in after_2, "the new backend's chain is in"
    size, old_elements = _map(nft, "old_2")
    assert size == 409
    assert len(old_elements) == 409, "listener 2's old table is loaded"

    # A backend removed from listener 2: its chain goes, the listener's other chains keep their
    # rules (a removal, a drain or a weight change writes elements only).
    shrunk = _plan(2, 409, 4, old=changed.current)
    dp.apply([plans[0], shrunk, plans[2]])
    after_removal = _handles(nft, 2)
    assert "b2_10_2_0_5" not in after_removal
    assert after_removal == {k: v for k, v in after_2.items() if k != "b2_10_2_0_5"}
    changed = shrunk
    after_2 = after_removal

    # Removing listener 1 touches neither 2 nor 3.
    after_3 = _handles(nft, 3)
    dp.apply([changed, plans[2]])
    assert _handles(nft, 3) == after_3
    assert _handles(nft, 2) == after_2
    assert _handles(nft, 1) == {}, "listener 1's chains are gone"


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
def test_element_only_changes_go_as_netlink_messages_and_land_exactly(netns):
    """The daemon's driver (libnftables + the netlink element writer): a drain is written without
    libnftables, in one transaction, and the kernel then holds exactly the planned buckets; no
    rule of any listener is rewritten."""
    cli = NamespaceNft(netns)
    plans = [_plan(1, 409, 8), _plan(2, 409, 8)]
    dp = _in_netns(netns, lambda: NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nflog_group=5))
    _in_netns(netns, lambda: dp.apply(plans))
    before = {lid: _handles(cli, lid) for lid in (1, 2)}
    drained = _plan(2, 409, 7, old=plans[1].current)
    # The drained backend stays in the plan (its connections drain): same backends, new tables.
    drained = ListenerPlan(2, drained.vip, "tcp", 80, plans[1].backends, drained.current, drained.old,
                           drained.unstable, pin_timeout_s=60,
                           pin_macs=tuple(m for _, m in plans[1].backends[:7]))
    sent, by_netlink = dp.transactions, dp.netlink_transactions
    _in_netns(netns, lambda: dp.apply([plans[0], drained]))
    assert dp.transactions == sent + 1
    assert dp.netlink_transactions == by_netlink + 1, "the drain went through libnftables"
    assert {lid: _handles(cli, lid) for lid in (1, 2)} == before
    listing = json.loads(cli.run("list map netdev lbagent cur_2", json_output=True))
    elems = next(item["map"] for item in listing["nftables"] if "map" in item)["elem"]
    kernel = {int(key): value["jump"]["target"] for key, value in elems}
    planned = {b: f"b2_{plans[1].backends[i][0].replace('.', '_')}" for b, i in enumerate(drained.current)}
    assert kernel == planned
    listing = json.loads(cli.run("list set netdev lbagent unstable_2", json_output=True))
    unstable = next(item["set"] for item in listing["nftables"] if "set" in item).get("elem", [])
    assert sorted(unstable) == sorted(drained.unstable.tolist())
    assert len(unstable) > 0
    listing = json.loads(cli.run("list set netdev lbagent pinok_2", json_output=True))
    pinok = next(item["set"] for item in listing["nftables"] if "set" in item)["elem"]
    assert sorted(pinok) == sorted(drained.pin_macs)


@pytest.mark.lab
def test_a_restarted_driver_recreates_maps_of_another_size(netns):
    """A daemon restarted with another table size for a listener (a new backend_cap, or maps an
    older daemon declared with 131,072 elements) recreates that listener's maps with the new
    size in its first transaction and leaves the other listener's maps as they were."""
    nft = NamespaceNft(netns)
    NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft).apply([_plan(1, 409, 4), _plan(2, 409, 4)])
    kept = _map(nft, "cur_2")
    restarted = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft)
    restarted.apply([_plan(1, 809, 4), _plan(2, 409, 4)])
    size, elements = _map(nft, "cur_1")
    assert size == 809
    assert len(elements) == 809
    listing = json.loads(nft.run("list set netdev lbagent unstable_1", json_output=True))
    assert next(item["set"] for item in listing["nftables"] if "set" in item)["size"] == 809
    assert _map(nft, "cur_2") == kept


@pytest.mark.lab
def test_a_refused_netlink_batch_names_the_set_and_applies_nothing(netns):
    """One batch is one transaction: a delete of a missing element fails the whole batch (the
    add before it is rolled back) with an error naming the set; a 65,537-bucket transition (over
    300 messages) is acknowledged without overflowing the socket."""
    cli = NamespaceNft(netns)
    size = 65537
    first = _plan(1, size, 8)

    def work() -> str:
        dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nflog_group=5)
        dp.apply([first])
        drained = ListenerPlan(1, first.vip, "tcp", 80, first.backends, _plan(1, size, 7).current,
                               first.current, np.flatnonzero(_plan(1, size, 7).current != first.current),
                               pin_timeout_s=60)
        dp.apply([drained])
        assert dp.netlink_transactions == 1
        bad = NetlinkElements.parse("add element netdev lbagent unstable_1 { 70001 }\n"
                                    "delete element netdev lbagent unstable_1 { 70000 }\n")
        with pytest.raises(NftError, match="delete elements of unstable_1: No such file") as excinfo:
            NetlinkElements().run(bad)
        return str(excinfo.value)

    _in_netns(netns, work)
    listing = json.loads(cli.run("list map netdev lbagent old_1", json_output=True))
    assert len(next(item["map"] for item in listing["nftables"] if "map" in item)["elem"]) == size
    listing = json.loads(cli.run("list set netdev lbagent unstable_1", json_output=True))
    assert 70001 not in next(item["set"] for item in listing["nftables"] if "set" in item).get("elem", [])


@pytest.mark.lab
def test_a_new_table_size_recreates_the_maps_in_one_transaction(netns):
    """The same driver, a listener's table size changed (its backend cap grew) and a backend
    gone: its maps are recreated with the new size, the gone backend's chain is deleted."""
    nft = NamespaceNft(netns)
    dp = NftDataplane("eth0", "02:aa:00:00:00:01", seed=7, nft=nft)
    dp.apply([_plan(1, 409, 5)])
    sent = dp.transactions
    dp.apply([_plan(1, 809, 4)])
    assert dp.transactions == sent + 1
    size, elements = _map(nft, "cur_1")
    assert size == 809
    assert len(elements) == 809
    assert "b1_10_1_0_5" not in _handles(nft, 1)
