"""Issue 16 (chaos, part 2): full disks under the portal's log and under an agent's state cache.

Each sits on a tiny tmpfs of its own (mounted under a unique directory, unmounted even on
failure), filled to the last byte while REST changes flow:
- the portal's log (its stderr, redirected into a file as a process manager does): the API
  keeps answering, the agents keep converging, and /metrics counts the records that could not
  be written (datacenter_log_write_errors_total);
- mux-a's state cache: the agent keeps applying what the portal sends (every listener ACTIVE,
  both agents run each listener's current table), logs a clear error naming the file and the
  cause once, reports portal.state_cache_write_errors in its stats (the portal stores them), and
  writes the cache again once space is freed.
The portal runs in the embedded layout (SQLite, in-memory channel layer): what is tested is the
disks, not the services.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.test_control_plane_restarts import Stack, change_stream
from tests.environment import need_root
from tests.push.stack import AgentProcess, PortalServer, seed_sqlite_layout
from tests.services import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

TINY_DISK = "256k"
CONVERGE_TIMEOUT_S = 120.0  # generous: a busy 2-core machine; convergence, not speed, is tested


def _mount_tmpfs(path: Path) -> None:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TINY_DISK},mode=0755", "tmpfs", str(path)], check=True
    )


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=False)
        if os.path.ismount(path):  # a process of ours still holds a file there: detach it anyway
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk has no byte left; returns it (delete it to free)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for chunk in (65536, 1):  # then byte by byte: the last partial block
            with contextlib.suppress(OSError):
                while handle.write(b"\0" * chunk):
                    pass
    probe = disk / "probe"
    with pytest.raises(OSError, match="No space left"):
        probe.write_bytes(b"x" * 4096)
    probe.unlink(missing_ok=True)
    return filler


@pytest.fixture(scope="module")
def disks() -> Iterator[dict[str, Path]]:
    need_root()
    root = Path(tempfile.mkdtemp(prefix="dc-chaoscp-disk-", dir="/tmp"))
    mounted = {"log": root / "log", "state": root / "state"}
    try:
        for path in mounted.values():
            _mount_tmpfs(path)
        yield mounted
    finally:
        for path in mounted.values():
            _unmount(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@pytest.fixture(scope="module")
def stack(disks, tmp_path_factory) -> Iterator[Stack]:
    import sqlite3

    workdir = tmp_path_factory.mktemp("chaos-disk-full")
    database = workdir / "db.sqlite3"
    seeded = seed_sqlite_layout(database)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "REDIS_URL"}
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{database}",
            "DJANGO_SECRET_KEY": "chaos-tests-not-a-secret",
            "DATACENTER_EMBEDDED_WORKER": "0",
            "DATACENTER_VAR_DIR": str(workdir / "var"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "LB_AGENT_WATCH_INTERVAL_S": "0.5",
        }
    )
    portal = PortalServer(env=env, workdir=disks["log"])  # its stderr goes to the tiny disk
    agents: dict[str, AgentProcess] = {}
    try:
        portal.start()
        for name, token in seeded["tokens"].items():
            extra = ("--state-cache", str(disks["state"] / f"{name}.cache.json")) if name == "mux-a" else ()
            agents[name] = AgentProcess(name, token, portal, workdir, extra_args=extra)
            agents[name].start()

        def query(sql: str) -> list[tuple]:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=20) as db:
                return db.execute(sql).fetchall()

        listeners = {lid: "a_member" for lid in seeded["listeners_a"]}
        listeners[seeded["listener_b"]] = "b_member"
        built = Stack(query, portal, agents, seeded["keys"], listeners)
        built.wait_converged(CONVERGE_TIMEOUT_S, "start-up")
        yield built
    finally:
        for agent in agents.values():
            agent.stop()
        portal.stop()


def _changes_go_through(stack: Stack, tag: int, count: int) -> None:
    with change_stream(stack, tag) as stream:
        since = time.monotonic()
        stream.wait(lambda: stream.count(since, ok=True) >= count, f"{count} changes", CONVERGE_TIMEOUT_S)
    failed = [p for p in stack.puts if p.at >= since and p.status != 200]
    assert not failed, f"{len(failed)} change(s) failed on a full disk: {sorted({p.status for p in failed})}"
    stack.wait_converged(CONVERGE_TIMEOUT_S, f"changes of stream {tag}")


def _log_write_errors(stack: Stack) -> float:
    status, body = stack.api_text("operator", "/metrics")
    assert status == 200, body[:300]
    for line in body.splitlines():
        if line.startswith("datacenter_log_write_errors_total "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no datacenter_log_write_errors_total")


def test_portal_keeps_answering_with_its_log_on_a_full_disk(stack: Stack, disks) -> None:
    assert _log_write_errors(stack) == 0
    filler = fill(disks["log"])
    try:
        _changes_go_through(stack, 40, 20)
        # Something worth logging while the disk is full: agents presenting a wrong token (the
        # first lines may still fit in the log file's last, partly written page).
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        def refused_and_counted() -> bool:
            with pytest.raises(InvalidStatus, match="403"):
                connect(stack.portal.ws_url, additional_headers={"Authorization": "Bearer wrong"}, proxy=None)
            return _log_write_errors(stack) > 0

        wait_until(refused_and_counted, timeout_s=CONVERGE_TIMEOUT_S, what="a failed log write counted",
                   interval_s=0)
        assert stack.portal.process.poll() is None, "the portal died with its log disk full"
    finally:
        filler.unlink()
    _changes_go_through(stack, 41, 6)


def _stats(stack: Stack, agent: str) -> dict:
    import json

    rows = stack.query(f"SELECT last_stats FROM loadbalancing_agentnode WHERE name = '{agent}'")  # noqa: S608
    assert rows, f"no agent {agent}"
    return json.loads(rows[0][0]) if isinstance(rows[0][0], str) else rows[0][0]


def test_agent_keeps_applying_with_its_state_cache_on_a_full_disk(stack: Stack, disks) -> None:
    agent = stack.agents["mux-a"]
    cache = disks["state"] / "mux-a.cache.json"
    # written once applies pause (lbagent.portal.CACHE_QUIET_S)
    wait_until(cache.exists, timeout_s=CONVERGE_TIMEOUT_S, what="mux-a to write its state cache")
    filler = fill(disks["state"])
    try:
        _changes_go_through(stack, 42, 20)
        wait_until(
            lambda: "cannot write the state cache" in agent.log(),
            timeout_s=CONVERGE_TIMEOUT_S,
            what="mux-a to report the full disk",
        )
        line = next(ln for ln in agent.log().splitlines() if "cannot write the state cache" in ln)
        assert str(cache) in line, line
        assert "No space left on device" in line, line
        assert "still applying and serving" in line, line
        wait_until(
            lambda: _stats(stack, "mux-a").get("portal.state_cache_write_errors", 0) >= 1,
            timeout_s=CONVERGE_TIMEOUT_S,
            what="the portal to store mux-a's state-cache write error",
        )
        assert agent.alive()
        assert agent.log().count("cannot write the state cache") == 1, "the error is said once, not per apply"
    finally:
        filler.unlink()
    # Space again: the state the agent runs reaches the cache without waiting for a new change
    # (a failed write is retried), and later changes are cached as usual.
    _wait_cached(agent, cache)
    assert f"state cache {cache} written again" in agent.log()
    _changes_go_through(stack, 43, 6)
    _wait_cached(agent, cache)


def _wait_cached(agent: AgentProcess, cache: Path) -> None:
    import json

    applied = agent.applied()
    assert applied is not None

    def cached_generation() -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads(cache.read_text())["generation"]
        return None

    wait_until(
        lambda: cached_generation() == applied["generation"],
        timeout_s=CONVERGE_TIMEOUT_S,
        what=f"the cache to reach generation {applied['generation']}",
    )
