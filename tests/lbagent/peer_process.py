"""A mux's peer endpoint in its own process, for tests: `lbagent.peer.FlowOwner` on a real socket.

Usage: python peer_process.py NAME KEY_HEX — prints "PORT <n>" once listening, then reads
commands from stdin ("PEER name host port", "OWNERS name,name,..."), answering "OK" to each, or
"COUNTERS", answered with its counters (plus "records") as one JSON line; on EOF prints its
peer counters (plus "records") as JSON. Copies of new records go to the other owner
every 20 ms, as an agent would batch them."""

import asyncio
import dataclasses
import json
import sys

from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.peer import FlowOwner, PeerNode

TABLE_SIZE = 101


async def main(name: str, key: bytes) -> None:
    store = RecordStore(max_records=10_000)
    owner = FlowOwner(name, store, tables=lambda _lid: None)  # no tables: owners answer the hint
    node = PeerNode(name, key, owner, timeout_s=0.5)
    _host, port = await node.start("127.0.0.1", 0)
    print(f"PORT {port}", flush=True)

    async def flusher() -> None:
        while True:
            await owner.flush(node)
            await asyncio.sleep(0.02)

    loop = asyncio.get_running_loop()
    flushing = loop.create_task(flusher())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "PEER":
            node.peers[line[1]] = (line[2], int(line[3]))
        elif line[0] == "OWNERS":
            owner.ownership = build_ownership(line[1].split(","), owner_seed=1, table_size=TABLE_SIZE)
        elif line[0] == "COUNTERS":  # lets a test wait for an event instead of sleeping
            print(json.dumps({**dataclasses.asdict(node.counters), "records": len(store)}), flush=True)
            continue
        print("OK", flush=True)
    flushing.cancel()
    await owner.flush(node)  # copies still queued go out now (a test waits for them via COUNTERS)
    out = dataclasses.asdict(node.counters)
    out["records"] = len(store)
    print(json.dumps(out), flush=True)
    node.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], bytes.fromhex(sys.argv[2])))
