"""Running commands and opening sockets inside named network namespaces (the lab's, never others)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class CommandError(RuntimeError):
    """A command failed; carries the command line and its stderr."""


def run(argv: Sequence[str], *, netns: str | None = None, check: bool = True, input_text: str | None = None,
        timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """Run argv (inside `netns` when given) and return the completed process."""
    full = (["ip", "netns", "exec", netns, *argv]) if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, input=input_text, timeout=timeout_s,
                          check=False)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(full)!r} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


_executors: dict[str, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def _executor(name: str) -> ThreadPoolExecutor:
    # One thread per namespace that has entered it; sockets made there belong to that namespace
    # for their whole life and can be used from any thread afterwards.
    with _executors_lock:
        ex = _executors.get(name)
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{name}",
                                    initializer=_enter_netns, initargs=(name,))
            _executors[name] = ex
        return ex


def socket_in(netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in network namespace `netns`."""
    return _executor(netns).submit(socket.socket, family, kind).result(timeout=10)


def forget(netns: str) -> None:
    """Drop the helper thread of a namespace (call before deleting it)."""
    with _executors_lock:
        ex = _executors.pop(netns, None)
    if ex is not None:
        ex.shutdown(wait=False)


def namespace_pids(netns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]
