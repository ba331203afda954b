"""The agent's own files under faults, without a lab: the daemon's wake-up pipe is not kept for
life, the last good state refuses a damaged file by name, and an atomic write that hits a full
disk leaves the previous file whole."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from lbagent.daemon import DaemonOptions, MuxDaemon
from lbagent.state import (
    StateError,
    Vip,
    dump_last_good_vip,
    parse_last_good_vip,
    parse_state,
    write_file_atomically,
)
from tests.environment import need_root

pytestmark = [pytest.mark.chaos]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_daemon_objects_do_not_keep_their_wakeup_pipe(tmp_path: Path) -> None:
    before = _open_fds()
    for _ in range(50):
        daemon = MuxDaemon(DaemonOptions(config=tmp_path / "state.json", run_dir=tmp_path))
        daemon._close_wake_fds()  # what shutdown() ends with (the rest of it needs a data plane)
        daemon.stop()  # a late SIGTERM after shutdown must not write to a closed (or reused) fd
        assert daemon._wait_for_stop(0.0)
    for _ in range(50):
        MuxDaemon(DaemonOptions(config=tmp_path / "state.json", run_dir=tmp_path))  # dropped unused
    assert _open_fds() == before


def _vips() -> dict[str, Vip]:
    document = {
        "version": 1,
        "generation": 3,
        "node": "mux-1",
        "cluster": {
            "muxes": [],
            "hash_seed": 1,
            "owner_seed": 2,
            "table_size": 251,
            "peer_key": "00" * 16,
            "redirect_key": "11" * 16,
            "max_records": 1000,
        },
        "vips": [
            {
                "address": "203.0.113.5",
                "listeners": [
                    {
                        "id": 5,
                        "protocol": "tcp",
                        "port": 80,
                        "generation": 2,
                        "backends": [{"address": "10.0.0.5", "port": 80, "weight": 1, "state": "active"}],
                    }
                ],
            }
        ],
    }
    return {vip.address: vip for vip in parse_state(document).vips}


def test_last_good_round_trips_and_names_what_is_wrong() -> None:
    vip = next(iter(_vips().values()))
    assert parse_last_good_vip(dump_last_good_vip(vip)) == vip
    damaged = json.loads(dump_last_good_vip(vip))
    damaged["vip"]["listeners"][0]["port"] = "eighty"
    with pytest.raises(StateError, match=r"vip\.listeners\[0\]\.port"):
        parse_last_good_vip(json.dumps(damaged))
    with pytest.raises(StateError, match="not valid JSON"):
        parse_last_good_vip(dump_last_good_vip(vip)[:40])  # a torn file
    with pytest.raises(StateError, match="version"):
        parse_last_good_vip(json.dumps({"version": 9, "vip": {}}))


def test_an_atomic_write_on_a_full_disk_keeps_the_previous_file() -> None:
    need_root()
    root = Path(tempfile.mkdtemp(prefix="dc-chaoscp-atomic-", dir="/tmp"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)], check=True)
        target = root / "last-good.json"
        write_file_atomically(target, "previous", durable=True)
        with pytest.raises(OSError, match="No space left"):
            write_file_atomically(target, "x" * 200_000, durable=True)
        assert target.read_text() == "previous"
        assert sorted(p.name for p in root.iterdir()) == ["last-good.json"]  # no temporary left behind
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", str(root)], check=False)
        os.rmdir(root)
