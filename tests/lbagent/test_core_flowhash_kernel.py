"""The kernel agrees: nft's `jhash ... mod 65537 seed S [offset slot << 17]` marks packets with
flow_bucket's value (above it, the slot).

Real nftables in a throwaway network namespace; UDP packets over its loopback, one counter rule
per flow matching the bucket Python computed."""

import os
import random
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from lbagent.core.flowhash import MARK_BUCKET_BITS, bucket_of_mark, flow_bucket
from tests.environment import need, need_binary, need_root


@pytest.fixture
def netns():
    need_root()
    need_binary("nft", "ip")
    name = f"dccore{os.getpid()}{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.lab
@pytest.mark.parametrize("slot", [0, 5, 32767])
def test_kernel_jhash_mod_matches_flow_bucket(netns, slot):
    """Also with the mux's offset (`slot << 17`, the listener's slot above the bucket, up to the
    mark's top bit): the mark is `slot << 17 | flow_bucket`, and `bucket_of_mark` gives it back."""
    need(shutil.which("nft") is not None, "needs nft")
    rng = random.Random(7)
    seed = rng.randrange(2**32)
    flows = sorted({(rng.randrange(1024, 65535), rng.randrange(1, 65535)) for _ in range(60)})
    offset = f" offset {slot << MARK_BUCKET_BITS}" if slot else ""
    rules = ["table ip dccore {", " chain out {", "  type filter hook output priority 0;",
             "  meta mark set jhash ip saddr . ip daddr . ip protocol . th sport . th dport "
             f"mod 65537 seed {seed}{offset};"]
    for sport, dport in flows:
        b = flow_bucket("127.0.0.1", "127.0.0.2", socket.IPPROTO_UDP, sport, dport, seed=seed,
                        table_size=65537)
        mark = slot << MARK_BUCKET_BITS | b
        assert bucket_of_mark(mark) == b
        rules.append(f"  udp sport {sport} udp dport {dport} meta mark {mark} counter;")
    rules += [" }", "}"]
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input="\n".join(rules) + "\n",
                   text=True, check=True)
    sender = (
        "import socket, sys\n"
        f"for sp, dp in {flows!r}:\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.bind(('127.0.0.1', sp)); s.sendto(b'x', ('127.0.0.2', dp)); s.close()\n")
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", sender], check=True, timeout=30)
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "dccore"],
                             capture_output=True, text=True, check=True).stdout
    matched = sum(1 for line in listing.splitlines() if "meta mark" in line and "packets 1 " in line)
    assert matched == len(flows), listing
