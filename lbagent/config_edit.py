"""Operator edits of a desired-state document, for a mux run without the portal: add, drain or
remove one backend of a listener the way the portal would, so the change never breaks a
connection. Each edit bumps the listener's and the document's generation and writes `previous`
(the listener's backends before the edit, draining until now + the listener's drain timeout),
then validates the result with the daemon's own parser before it is written (atomically).

    lbagent state add-backend FILE... --listener ID --address A [--port P] [--weight W] [--mac M]
    lbagent state drain-backend FILE... --listener ID --address A [--port P]
    lbagent state remove-backend FILE... --listener ID --address A [--port P]
    lbagent validate FILE...

Several files (one per mux) get the same edit with the same drain deadline.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lbagent.state import StateError, load_state_file, parse_state

__all__ = ["EditError", "add_backend", "drain_backend", "main", "remove_backend", "validate_main"]


class EditError(ValueError):
    """The edit cannot be made (unknown listener, backend already there or missing)."""


def _listener(doc: dict[str, Any], listener_id: int) -> dict[str, Any]:
    for vip in doc.get("vips", []):
        for listener in vip.get("listeners", []):
            if listener.get("id") == listener_id:
                return listener
    known = sorted(li.get("id") for v in doc.get("vips", []) for li in v.get("listeners", []))
    raise EditError(f"no listener with id {listener_id} in the document (listeners: {known})")


def _index(listener: dict[str, Any], address: str, port: int | None) -> int:
    matches = [i for i, b in enumerate(listener["backends"])
               if b.get("address") == address and (port is None or b.get("port") == port)]
    if not matches:
        have = [f"{b.get('address')}:{b.get('port')}" for b in listener["backends"]]
        raise EditError(f"listener {listener['id']} has no backend {address}{f':{port}' if port else ''} "
                        f"(backends: {have})")
    if len(matches) > 1:
        raise EditError(f"listener {listener['id']} has {len(matches)} backends at {address}: give --port")
    return matches[0]


def _new_generation(doc: dict[str, Any], listener: dict[str, Any], now: float) -> dict[str, Any]:
    """Start a change of `listener`: `previous` = what it has now, generations bumped."""
    listener["previous"] = {"generation": listener["generation"],
                            "backends": copy.deepcopy(listener["backends"]),
                            "drain_deadline": now + listener.get("drain_timeout_s", 30)}
    listener["generation"] += 1
    doc["generation"] += 1
    return listener


def add_backend(doc: dict[str, Any], listener_id: int, backend: dict[str, Any], now: float) -> dict[str, Any]:
    """A copy of `doc` with `backend` added to the listener (a new generation)."""
    out = copy.deepcopy(doc)
    listener = _listener(out, listener_id)
    if any(b.get("address") == backend["address"] and b.get("port") == backend["port"]
           for b in listener["backends"]):
        raise EditError(f"listener {listener_id} already has backend {backend['address']}:{backend['port']}")
    _new_generation(out, listener, now)["backends"].append(backend)
    return out


def drain_backend(doc: dict[str, Any], listener_id: int, address: str, port: int | None,
                  now: float) -> dict[str, Any]:
    """A copy of `doc` with the backend set to `draining`: no new connections; its connections
    live until the drain deadline and end there."""
    out = copy.deepcopy(doc)
    listener = _listener(out, listener_id)
    i = _index(listener, address, port)
    if listener["backends"][i].get("state") == "draining":
        raise EditError(f"backend {address} of listener {listener_id} is already draining")
    _new_generation(out, listener, now)["backends"][i]["state"] = "draining"
    return out


def remove_backend(doc: dict[str, Any], listener_id: int, address: str, port: int | None,
                   now: float) -> dict[str, Any]:
    """A copy of `doc` without the backend; its connections live until the drain deadline."""
    out = copy.deepcopy(doc)
    listener = _listener(out, listener_id)
    i = _index(listener, address, port)
    del _new_generation(out, listener, now)["backends"][i]
    return out


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # the daemon re-reads the file on rename: never a half-written document


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lbagent state", description="Edit desired-state documents.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("add-backend", "add a backend"), ("drain-backend", "drain a backend"),
                       ("remove-backend", "remove a backend (connections live until the drain deadline)")):
        s = sub.add_parser(name, help=what)
        s.add_argument("files", nargs="+", type=Path, help="desired-state documents (one per mux)")
        s.add_argument("--listener", type=int, required=True, help="listener id")
        s.add_argument("--address", required=True, help="backend address")
        s.add_argument("--port", type=int, help="backend port (add: default the listener's port)")
        if name == "add-backend":
            s.add_argument("--weight", type=int, default=1)
            s.add_argument("--mac", help="backend MAC (default: resolved by the mux)")
            s.add_argument("--host", help="backend host name (default: the address)")
    args = p.parse_args(argv)
    now = time.time()  # one deadline for every file: the muxes drain together
    edited: list[tuple[Path, dict[str, Any]]] = []
    for path in args.files:
        try:
            load_state_file(path)  # refuse to edit a document the daemon would refuse
            doc = json.loads(path.read_text())
            if args.command == "add-backend":
                port = args.port or _listener(doc, args.listener)["port"]
                backend = {"address": args.address, "port": port, "weight": args.weight, "state": "active",
                           "mac": args.mac, "host": args.host or args.address}
                new = add_backend(doc, args.listener, backend, now)
            elif args.command == "drain-backend":
                new = drain_backend(doc, args.listener, args.address, args.port, now)
            else:
                new = remove_backend(doc, args.listener, args.address, args.port, now)
            parse_state(new)
        except (StateError, EditError) as exc:
            print(f"lbagent state {args.command}: {path}: {exc}", file=sys.stderr)
            return 1
        edited.append((path, new))
    for path, new in edited:  # all or nothing: no file is written when one edit is refused
        _write_atomically(path, new)
        listener = _listener(new, args.listener)
        print(f"{path}: listener {args.listener} generation {listener['generation']} "
              f"(previous {listener['previous']['generation']} drains until "
              f"{time.strftime('%H:%M:%S', time.localtime(listener['previous']['drain_deadline']))}), "
              f"document generation {new['generation']}")
    return 0


def validate_main(argv: list[str] | None = None) -> int:
    """`lbagent validate FILE...`: the daemon's checks, the offending field, exit status 1."""
    p = argparse.ArgumentParser(prog="lbagent validate",
                                description="Check desired-state documents as the mux daemon does.")
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            state = load_state_file(path)
        except StateError as exc:
            print(f"{path}: refused: {exc}", file=sys.stderr)
            status = 1
            continue
        listeners = sum(len(v.listeners) for v in state.vips)
        print(f"{path}: ok: generation {state.generation}, node {state.node}, {len(state.vips)} VIP(s), "
              f"{listeners} listener(s)")
        for vip in state.vips:
            # What the daemon plans per VIP (the document is valid, but the mux will not serve it).
            if ":" in vip.address:
                print(f"{path}: warning: VIP {vip.address}: IPv6 is not supported by the nft data plane "
                      f"(not served)", file=sys.stderr)
            if vip.bypass:
                hosts = {b.address for li in vip.listeners for b in li.backends if b.state == "active"}
                if len(hosts) != 1 and vip.bypass_next_hop is None:
                    print(f"{path}: warning: VIP {vip.address}: bypass with {len(hosts)} active backend "
                          f"hosts (need 1)", file=sys.stderr)
        if state.node not in {m.name for m in state.cluster.muxes}:
            print(f"{path}: warning: node {state.node!r} is not in cluster.muxes (give --iface to "
                  f"`lbagent run`)", file=sys.stderr)
    return status
