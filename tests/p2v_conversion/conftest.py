"""Fixtures of the P2V conversion tests: real libvirtd, a storage pool of our own, stand-ins, a worker."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.environment import need, need_binary, need_root
from tests.services import celery_worker  # noqa: F401  (session fixture)
from tests.standin.machine import standin_fixture

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

# The session's Celery worker inherits this process's environment (conftests load before it
# starts): a copy whose source is gone for good gives up after 12 s without progress instead of
# production's 15 minutes, so "source gone" tests end in seconds; outages shorter than that resume.
os.environ.setdefault("P2V_COPY_RETRY_INITIAL_S", "0.5")
os.environ.setdefault("P2V_COPY_RETRY_MAX_S", "5")
os.environ.setdefault("P2V_COPY_RETRY_WINDOW_S", "12")

conversion_standin_bios = standin_fixture("bios")
conversion_standin_uefi = standin_fixture("uefi")


@pytest.fixture(scope="session")
def libvirt_conn():
    """A connection to the real libvirtd (started without systemd by scripts/start-libvirtd.sh)."""
    need_root()
    need_binary("virsh", "qemu-system-x86_64", "/usr/sbin/libvirtd")
    try:
        import libvirt
    except ImportError:
        need(False, "needs libvirt-python (requirements-system.txt)")
    started = subprocess.run(
        [str(REPO_ROOT / "scripts" / "start-libvirtd.sh")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert started.returncode == 0, f"start-libvirtd.sh failed: {started.stderr}"
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def p2v_prefix() -> str:
    """Unique prefix of every domain, volume and pool these tests create (and the only ones removed)."""
    return f"p2vt{secrets.token_hex(3)}-"


@pytest.fixture(scope="session")
def p2v_pool(libvirt_conn, p2v_prefix) -> Iterator:
    """A `dir` storage pool of our own under var/tmp; everything with our prefix is removed at the end."""
    import libvirt

    path = REPO_ROOT / "var" / "tmp" / f"{p2v_prefix}pool"
    path.mkdir(parents=True, exist_ok=True)
    pool = libvirt_conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{p2v_prefix}pool</name><target><path>{path}</path></target></pool>", 0
    )
    pool.create(0)
    try:
        yield pool
    finally:
        for domain in libvirt_conn.listAllDomains(0):
            if domain.name().startswith(p2v_prefix):
                if domain.isActive():
                    domain.destroy()  # a transient one (the verify stage's twin) is gone with this
                if domain.isPersistent():
                    domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()
        shutil.rmtree(path, ignore_errors=True)


def leftovers(conn, pool, prefix: str) -> list[str]:
    """Domains and volumes with our prefix that still exist (what a rollback must have removed)."""
    pool.refresh(0)
    names = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    names += [v.name() for v in pool.listAllVolumes(0) if v.name().startswith(prefix)]
    return names


def standin_endpoint(standin):
    """A p2v.ssh.Endpoint for a stand-in (its host key pinned)."""
    from p2v import ssh

    return ssh.Endpoint(
        address=standin.address,
        port=standin.port,
        user=standin.user,
        private_key=standin.private_key,
        host_key_fingerprint=standin.host_key_fingerprint,
    )
