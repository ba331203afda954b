"""The lab's backend service: answers every line on TCP (and every UDP datagram) with its own name,
so a client can tell which backend served it; connections may stay open for as long as they like.

Run inside a backend namespace: python -m lbagent.lab.service --name web-1 --bind 203.0.113.10:80 ...
"""

from __future__ import annotations

import argparse
import asyncio
import signal


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        assert self.transport is not None
        self.transport.sendto(self.name + b" " + data[:64], addr)


def _parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, got {text!r}")
    return host.strip("[]"), int(port)  # an IPv6 address may come bracketed


async def _serve(name: str, tcp: list[tuple[str, int]], udp: list[tuple[str, int]]) -> None:
    prefix = name.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(prefix + b" " + line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # a client that resets is the client's business; the service keeps serving others
        finally:
            writer.close()

    servers = [await asyncio.start_server(handle, host, port, backlog=4096, reuse_address=True)
               for host, port in tcp]
    loop = asyncio.get_running_loop()
    for host, port in udp:
        await loop.create_datagram_endpoint(lambda: _Echo(prefix), local_addr=(host, port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name} serving tcp={tcp} udp={udp}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", action="append", type=_parse_bind, default=[], help="TCP ADDRESS:PORT")
    parser.add_argument("--udp", action="append", type=_parse_bind, default=[], help="UDP ADDRESS:PORT")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.name, args.bind, args.udp))


if __name__ == "__main__":
    main()
