"""New-flow floods for the lab: pre-built TCP frames of distinct flows in unstable buckets, sent
straight at a mux's MAC from the router namespace. Shared by tests/lab and bench/dataplane.py."""

from __future__ import annotations

import multiprocessing
import socket
import struct
import time

import numpy as np

from lbagent.core.flowhash import flow_buckets, ipv4_to_int
from lbagent.core.transition import ListenerTables
from lbagent.lab import netns

FLOOD_SOURCES = "198.18.0.0/15"  # benchmark range: backends' answers to it go nowhere
TCP_SYN, TCP_ACK = 0x02, 0x10


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def tcp_frames(dst_mac: str, src_mac: str, flows: list[tuple[int, int]], vip: str, port: int = 80,
               flags: int = TCP_SYN) -> list[bytes]:
    """One Ethernet frame per (source address, source port): a TCP segment with `flags` to vip:port."""
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    daddr = socket.inet_aton(vip)
    frames = []
    for saddr, sport in flows:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, saddr.to_bytes(4, "big"), daddr)
        head = head[:10] + struct.pack("!H", _ip_checksum(head)) + head[12:]
        ack = 1 if flags & TCP_ACK else 0
        tcp = struct.pack("!HHIIBBHHH", sport, port, 1, ack, 5 << 4, flags, 64240, 0, 0)
        frames.append(eth + head + tcp)
    return frames


def unstable_flows(count: int, tables: ListenerTables, vip: str, *, seed: int, table_size: int,
                   port: int = 80, rng_seed: int = 7, exclude: set[tuple[int, int]] | None = None
                   ) -> list[tuple[int, int]]:
    """`count` distinct (source address, source port) from FLOOD_SOURCES whose bucket is unstable."""
    base = ipv4_to_int(FLOOD_SOURCES.split("/")[0])
    rng = np.random.default_rng(rng_seed)
    seen = set(exclude or ())
    out: list[tuple[int, int]] = []
    vip_int = ipv4_to_int(vip)
    while len(out) < count:
        src = base + rng.integers(0, 1 << 17, size=count * 4, dtype=np.int64)
        sport = rng.integers(1024, 65536, size=count * 4, dtype=np.int64)
        buckets = flow_buckets(src, vip_int, 6, sport, port, seed=seed, table_size=table_size)
        keep = tables.unstable[buckets]
        for pair in zip(src[keep].tolist(), sport[keep].tolist(), strict=True):
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out[:count]


def _sender(ns: str, iface: str, frames: list[bytes], ready, go) -> None:  # in a child process
    netns._enter_netns(ns)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    send = sock.send
    ready.release()
    go.wait()
    for frame in frames:
        try:
            send(frame)
        except BlockingIOError:  # a full device queue: wait for it, do not skip the frame
            time.sleep(0.0001)
            send(frame)


def send_frames(ns: str, iface: str, frames: list[bytes], processes: int = 1) -> float:
    """Send every frame once from namespace `ns` out of `iface`, split over `processes` sender
    processes (one Python raw socket tops out near 100k frames/s here); returns the seconds from
    the common start to the last frame sent."""
    ctx = multiprocessing.get_context("fork")  # children inherit the frames: no pickling
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_sender, args=(ns, iface, frames[i::processes], ready, go), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=20):
                raise RuntimeError("a sender process did not start")
        t0 = time.monotonic()
        go.set()
        for p in procs:
            p.join(timeout=300)
        took = time.monotonic() - t0
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"sender processes failed with exit codes {bad}")
        return took
    finally:
        for p in procs:  # only our own children, by their handle
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
