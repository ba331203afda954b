"""The peer protocol between real processes on loopback, and what it does with hostile input."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbagent.peer import (
    DecodeError,
    MsgType,
    PeerNode,
    ReplayGuard,
    decode_message,
    encode_message,
    peer_key_from_hex,
)
from tests.services import wait_until

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("peer_process.py")
KEY = bytes.fromhex("11" * 32)
FLOW = (0x0A000001, 0xCB00710A, 6, 40000, 80)


class Owner:
    """A peer_process.py child: a real mux peer endpoint in another process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), name, KEY.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = self.proc.stdout.readline().split()
        assert line[0] == "PORT", line
        self.port = int(line[1])

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "OK"

    def counters(self) -> dict:
        self.proc.stdin.write("COUNTERS\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def finish(self) -> dict:
        self.proc.stdin.close()
        out = self.proc.stdout.readline()
        self.proc.wait(timeout=10)
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class NoRequests:
    def on_query(self, *a):
        raise AssertionError("the test client serves nothing")

    on_record = on_replicate = on_query


@pytest.fixture
def owners():
    started = []
    try:
        for n in ("mux-a", "mux-b"):
            started.append(Owner(n))
        yield started
    finally:
        for o in started:
            o.kill()


async def _client(owners, **kw) -> PeerNode:
    node = PeerNode("mux-c", KEY, NoRequests(), timeout_s=kw.get("timeout_s", 1.0))
    await node.start("127.0.0.1", 0)
    node.peers = {o.name: ("127.0.0.1", o.port) for o in owners}
    for o in owners:
        o.tell(f"PEER mux-c 127.0.0.1 {node.address[1]}")
        for other in owners:
            if other is not o:
                o.tell(f"PEER {other.name} 127.0.0.1 {other.port}")
    return node


def test_query_record_replicate_and_backup_between_processes(owners):
    a, b = owners
    for o in owners:
        o.tell("OWNERS mux-a,mux-b")

    async def scenario():
        # 5 s, not the daemon's 1 s: a loaded machine can delay a live owner's answer past 1 s,
        # and then the backup answers and the counters below would be off by one.
        node = await _client(owners, timeout_s=5.0)
        try:
            first = await node.query("mux-a", "mux-b", 1, FLOW, 7, "10.1.0.1:80")
            again = await node.query("mux-a", "mux-b", 1, FLOW, 7, "10.1.0.9:80")
            new_flow = (*FLOW[:3], 40001, 80)
            rec = await node.record("mux-a", "mux-b", 1, new_flow, 9, "10.1.0.2:80")
            late = await node.record("mux-a", "mux-b", 1, new_flow, 9, "10.1.0.3:80")
            # replication a -> b: wait until b holds both records (generous bound, not a guess)
            await asyncio.to_thread(wait_until, lambda: b.counters()["records"] == 2, timeout_s=60,
                                    what="mux-b to hold mux-a's two records")
            a.kill()  # the owner dies: the backup answers from its replica
            via_backup = await node.query("mux-a", "mux-b", 1, FLOW, 7, "10.1.0.9:80")
            return first, again, rec, late, via_backup, node.counters
        finally:
            node.close()

    first, again, rec, late, via_backup, counters = asyncio.run(scenario())
    assert (first.backend, first.status, first.answered_by) == ("10.1.0.1:80", "stored", "mux-a")
    assert (again.backend, again.status) == ("10.1.0.1:80", "found")  # not the new hint
    assert (rec.backend, rec.status) == ("10.1.0.2:80", "stored")
    assert (late.backend, late.status) == ("10.1.0.2:80", "found")  # first writer wins
    assert (via_backup.backend, via_backup.answered_by) == ("10.1.0.1:80", "mux-b")
    assert counters.timeouts == 1
    assert counters.backup_retries == 1
    b_counters = b.finish()
    assert b_counters["records"] == 2  # both of the owner's records were replicated
    assert b_counters["bad_mac"] == b_counters["replayed"] == b_counters["malformed"] == 0


def test_owner_process_survives_garbage_and_counts_it(owners):
    a, _b = owners

    async def scenario():
        node = await _client(owners)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            query = {"l": 1, "f": list(FLOW), "b": 1, "h": "x:1"}
            good = encode_message(KEY, MsgType.QUERY, "mux-c", 5, query, now=time.time())
            junk = [os.urandom(n) for n in (0, 1, 10, 60, 400)]
            truncated = [good[:n] for n in (3, 20, len(good) - 1)]
            wrong_key = [encode_message(b"k" * 32, MsgType.QUERY, "mux-c", 6, {}, now=time.time())]
            for d in junk + truncated + wrong_key + [good, good]:  # the second `good` is a replay
                sock.sendto(d, ("127.0.0.1", a.port))
            sent = len(junk + truncated + wrong_key) + 2
            await asyncio.to_thread(wait_until, lambda: a.counters()["received"] >= sent, timeout_s=60,
                                    what=f"mux-a to receive all {sent} datagrams")
            sock.close()
            # still serving
            return await node.query("mux-a", None, 1, (*FLOW[:3], 5555, 80), 3, "10.1.0.4:80")
        finally:
            node.close()

    answer = asyncio.run(scenario())
    assert answer is not None
    assert answer.backend == "10.1.0.4:80"
    c = a.finish()
    # 5 junk (a 0-byte datagram is delivered too), 3 truncated and 1 wrong key: malformed or bad MAC
    assert c["malformed"] + c["bad_mac"] == 5 + 3 + 1
    assert c["replayed"] == 1
    assert c["received"] == 5 + 3 + 1 + 2 + 1


datagrams = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail: b"LBP1" + tail, st.binary(max_size=200)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(datagrams, min_size=1, max_size=30), st.data())
def test_fuzz_random_truncated_replayed_wrong_key(raw, data):
    """Whatever arrives, the node keeps serving and every datagram lands in exactly one counter."""
    now = time.time()
    valid = [encode_message(KEY, MsgType.QUERY, "mux-x", i, {"l": 1, "f": list(FLOW), "b": 2, "h": "a:1"},
                            now=now) for i in range(3)]
    cut = data.draw(st.integers(1, len(valid[0]) - 1))
    flipped = bytearray(valid[1])
    flipped[data.draw(st.integers(0, len(flipped) - 1))] ^= 0xFF
    hostile = [*raw, valid[0][:cut], bytes(flipped), valid[2], valid[2],
               encode_message(b"w" * 32, MsgType.QUERY, "mux-x", 9, {}, now=now),
               encode_message(KEY, MsgType.QUERY, "stranger", 9, {}, now=now),
               encode_message(KEY, MsgType.ANSWER, "mux-x", 12345, {"be": "a", "s": "found"}, now=now),
               encode_message(KEY, MsgType.QUERY, "mux-x", 10, {"l": -1}, now=now),
               encode_message(KEY, MsgType.QUERY, "mux-x", 11, {}, now=now - 3600)]

    class Handler:
        def on_query(self, sender, lid, flow, bucket, hint):
            return hint, "stored"

        def on_record(self, *a):
            return "x", "stored"

        def on_replicate(self, *a):
            pass

    async def run():
        node = PeerNode("mux-y", KEY, Handler())
        await node.start()
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        node.peers = {"mux-x": sink.getsockname(), "mux-y": node.address}
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for d in hostile:
            sender.sendto(d, node.address)
        deadline = time.monotonic() + 60  # a generous bound; the loop ends as soon as all arrived
        while node.counters.received < len(hostile) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sender.close()
        sink.close()
        node.close()
        return node.counters

    c = asyncio.run(run())
    assert c.received == len(hostile)
    assert c.answered + c.dropped() == c.received
    assert c.answered == 1  # valid[2], once
    assert c.replayed == 1  # valid[2] again
    assert c.unknown_sender == 1
    assert c.stale == 1
    assert c.unexpected == 1
    assert c.bad_mac >= 1  # the wrong key (the truncated and flipped ones are bad_mac or malformed)


def test_decode_refuses_each_kind():
    replay = ReplayGuard(window_s=30)
    now = 1_000_000.0
    known = {"a"}.__contains__
    msg = encode_message(KEY, MsgType.QUERY, "a", 1, {"x": 1}, now=now)
    assert decode_message(msg, KEY, now=now, known_senders=known, replay=replay).payload == {"x": 1}
    for data, kind, at in [
        (msg, "replayed", now),
        (msg[:-1], "bad_mac", now),
        (b"XXXX" + msg[4:], "malformed", now),
        (encode_message(KEY, MsgType.QUERY, "a", 2, {}, now=now), "stale", now + 31),
        (encode_message(KEY, MsgType.QUERY, "b", 3, {}, now=now), "unknown_sender", now),
        (encode_message(b"z" * 32, MsgType.QUERY, "a", 4, {}, now=now), "bad_mac", now),
    ]:
        with pytest.raises(DecodeError) as exc:
            decode_message(data, KEY, now=at, known_senders=known, replay=replay)
        assert exc.value.kind == kind


def test_peer_key_validation():
    assert peer_key_from_hex("ab" * 16) == b"\xab" * 16
    with pytest.raises(ValueError, match="hex"):
        peer_key_from_hex("zz")
    with pytest.raises(ValueError, match="too short"):
        peer_key_from_hex("abcd")


def test_flow_owner_answers_queues_copies_and_hands_over():
    from lbagent.core.ownership import build_ownership
    from lbagent.core.records import RecordStore
    from lbagent.core.transition import ListenerTables, build_generation
    from lbagent.peer import FlowOwner

    m = 101
    tables = ListenerTables(build_generation(1, ["old-a", "old-b"], table_size=m)).with_generation(
        build_generation(2, ["new-a", "new-b", "new-c"], table_size=m), drain_deadline=1e9)
    bucket = int(tables.unstable_buckets()[0])
    own = build_ownership(["m1", "m2", "m3"], owner_seed=1, table_size=m)
    primary, backup = own.owners(bucket)
    owner = FlowOwner(primary, RecordStore(max_records=100), lambda lid: tables if lid == 1 else None,
                      clock=lambda: 5.0)
    owner.ownership = own
    assert owner.on_query("x", 1, FLOW, bucket, "hint") == (tables.fallback_backend(bucket), "stored")
    assert owner.on_query("x", 1, FLOW, bucket, "hint") == (tables.fallback_backend(bucket), "found")
    assert owner.on_query("x", 2, FLOW, bucket, "hint") == ("hint", "stored")  # unknown listener
    assert owner.on_record("x", 1, FLOW, bucket, "new-c") == (tables.fallback_backend(bucket), "found")
    outbox = owner.take_outbox()
    assert list(outbox) == [backup]
    assert len(outbox[backup]) == 2  # one copy per new record, to the backup owner
    # the primary leaves the cluster: everything it holds goes to the new owners, then is dropped
    rest = [m_ for m_ in ("m1", "m2", "m3") if m_ != primary]
    moved = owner.hand_over(build_ownership(rest, owner_seed=1, table_size=m))
    assert sum(len(v) for v in moved.values()) >= 2
    assert len(owner.store) == 0


def _outcome(call):
    """("ok", result) or ("refused", DecodeError kind); any other exception fails the test."""
    try:
        return "ok", call()
    except DecodeError as exc:
        return "refused", exc.kind


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40))
def test_decode_only_raises_decode_error_even_when_authenticated(payload, mtype, sender_len, sender):
    """Signed garbage (a buggy or newer peer) must be refused cleanly, like unsigned garbage."""
    import hashlib
    import hmac as hmac_mod
    import struct as struct_mod

    now = 1_000_000.0
    body = struct_mod.pack("!4sBQ8sIB", b"LBP1", mtype, int(now * 1000), os.urandom(8), 1, sender_len)
    body += sender + payload
    datagram = body + hmac_mod.new(KEY, b"lbagent-peer-v1\x00" + body, hashlib.sha256).digest()
    kind, value = _outcome(lambda: decode_message(datagram, KEY, now=now, known_senders=lambda s: True,
                                                   replay=ReplayGuard()))
    assert (kind, value) == ("refused", "malformed") or isinstance(value.payload, dict)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([MsgType.QUERY, MsgType.RECORD, MsgType.REPLICATE]),
       st.dictionaries(st.sampled_from(["l", "f", "b", "h", "be", "r"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=5),
                                    lambda kids: st.lists(kids, max_size=5), max_leaves=12)))
def test_request_fields_are_validated(mtype, payload):
    """Authenticated requests with wrong field types are refused with DecodeError, not a crash."""
    class Handler:
        def on_query(self, *a):
            return "x", "found"

        def on_record(self, *a):
            return "x", "found"

        def on_replicate(self, *a):
            pass

    node = PeerNode("me", KEY, Handler())
    kind, value = _outcome(lambda: node._handle_request(mtype, "peer", payload))
    assert (kind, value) == ("refused", "malformed") or value in (("x", "found"), ("-", "ok"))
