"""One lab per test session (the same builder as `lbagent lab up`), and both mux daemons running
on it; each test publishes its own VIP through `cluster` and removes it when done. Tests of mux
pools ask for `pool_cluster` instead: a second lab with POOL_MUXES muxes, built once per session
only when a test asks for it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from lbagent.lab import topology
from lbagent.lab.harness import LabCluster
from tests.environment import need, need_binary, need_root

POOL_MUXES = 4  # issue 12: ownership and replication are only risky with more than two muxes
POOL_SPARES = 1  # a mux namespace outside the pool, for the test where a mux joins it


def _lab_prerequisites() -> None:
    need_root()
    need_binary("ip", "nft", "iptables-nft", "bird", "birdc")
    need(shutil.which("exabgp") is not None or _venv_has("exabgp"), "needs ExaBGP (pip install exabgp)")
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        need(False, "needs the NetfilterQueue binding (requirements-system.txt)")


def _venv_has(name: str) -> bool:
    import sys
    from pathlib import Path

    return Path(sys.executable).with_name(name).exists()


@pytest.fixture(scope="session")
def lab() -> Iterator[topology.Lab]:
    _lab_prerequisites()
    built = topology.build()
    try:
        yield built
    finally:
        topology.teardown(built)


@pytest.fixture(scope="session")
def cluster(lab: topology.Lab) -> Iterator[LabCluster]:
    c = LabCluster(lab)
    c.start()
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="session")
def pool_lab() -> Iterator[topology.Lab]:
    """A lab of POOL_MUXES muxes and POOL_SPARES spare ones (its own prefix and namespaces,
    beside the two-mux `lab`)."""
    _lab_prerequisites()
    built = topology.build(mux_count=POOL_MUXES + POOL_SPARES)
    try:
        yield built
    finally:
        topology.teardown(built)


@pytest.fixture(scope="session")
def pool_cluster(pool_lab: topology.Lab) -> Iterator[LabCluster]:
    c = LabCluster(pool_lab, pool_size=POOL_MUXES)
    c.start()
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def pool(pool_cluster: LabCluster) -> Iterator[LabCluster]:
    """The session's pool lab with its original POOL_MUXES members, each running with
    transitions (restored before and after the test: a test may kill, stop or restart muxes,
    change the pool's members or turn transitions off)."""
    original = pool_cluster.all_muxes[:POOL_MUXES]

    def restore() -> None:
        if pool_cluster.muxes != original:
            pool_cluster.set_pool(original)
        stale = [m for m in pool_cluster.muxes if not m.alive() or not m.transitions]
        if stale:
            pool_cluster.restart_many(stale, transitions=True)

    restore()
    yield pool_cluster
    restore()
