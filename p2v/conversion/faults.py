"""Fault injection for the chaos tests (tests/chaos): hold a running stage at a named point so a
test can kill the worker there, mid-stage, at a moment it chose rather than one it raced for.

Off unless the worker's environment sets P2V_FAULT_HOLD_DIR: then a stage that reaches point
`<name>` while the file `<P2V_FAULT_HOLD_DIR>/hold-<name>` exists logs that it holds and waits
until the file is removed (or its job is cancelled or taken over). Points: `copy` (after a copy
checkpoint was saved, mid-disk), `build` (after the domain was defined), `adjust` (after the
filesystems were repaired, before the guest is edited), `verify` (the twin VM booting on its
isolated network). Never set it in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

HOLD_DIR_ENV = "P2V_FAULT_HOLD_DIR"
POLL_S = 0.2


def hold_file(point: str) -> Path | None:
    directory = os.environ.get(HOLD_DIR_ENV)
    return Path(directory) / f"hold-{point}" if directory else None


def armed(point: str) -> bool:
    """Whether a hold at `point` is asked for now (always False in production: no directory set)."""
    flag = hold_file(point)
    return flag is not None and flag.exists()


def hold(point: str, announce: Callable[[str], None], check: Callable[[], None]) -> None:
    """Wait while the hold file of `point` exists; `check` raises to end the wait (cancel, lease lost)."""
    flag = hold_file(point)
    if flag is None or not flag.exists():
        return
    announce(f"fault injection: holding in {point} while {flag} exists")
    while flag.exists():
        check()
        time.sleep(POLL_S)
