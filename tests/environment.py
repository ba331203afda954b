"""Where a test needs something the machine may lack: skip with the reason on a laptop, fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))


def need(condition: bool, reason: str) -> None:
    """Skip (or, when CI is set, fail) the calling test unless `condition` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires this test to run, but: {reason}")
    else:  # only outside CI: a laptop may lack root, libvirtd or a browser
        pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces, nftables, daemons)")


def need_binary(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs `{name}` on PATH (make test installs it as root)")
