"""Serve the portal with uvicorn on an inherited listening socket: `python -m tests.uvicorn_on_fd FD`.

Why not `uvicorn --fd`: uvicorn wraps an inherited descriptor as an AF_UNIX socket whatever it
is, so asyncio never sets TCP_NODELAY on the TCP connections it accepts, and every response on a
kept-alive connection then waits for the client's delayed ACK (about 40 ms: the API contract run
spent most of its time there). `socket.socket(fileno=...)` reads the real family.
"""

from __future__ import annotations

import socket
import sys

import uvicorn


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise SystemExit(
            "usage: python -m tests.uvicorn_on_fd FD  (a listening TCP socket inherited by the process)"
        )
    listener = socket.socket(fileno=int(sys.argv[1]))
    config = uvicorn.Config(
        "datacenter.asgi:application", lifespan="off", access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
