"""The copy's fallback reader for sources without python3 (POSIX sh + dd + cmp + split + sha256sum).

It must write exactly the stream the python3 reader writes (the host side is one implementation),
under the shells a source may have (dash, busybox ash, bash), skip the free sub-blocks it is given,
and fail with a message naming what is missing. The end-to-end copy runs over the stand-in's real
sshd into a real libvirt volume, compared byte for byte with `cmp`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from p2v import ssh
from p2v.conversion import copy as copy_mod
from tests.p2v_conversion.conftest import MiB, standin_endpoint
from tests.p2v_conversion.test_copy import allocated_bytes, new_volume, same_bytes
from tests.standin.machine import need_standin_tools, start_standin

SUB = copy_mod.SUB_BLOCK_BYTES
SHELLS = [
    pytest.param(argv, id=argv[0])
    for argv in (["dash"], ["busybox", "sh"], ["bash", "--posix"])
    if shutil.which(argv[0])
]


@pytest.fixture(scope="module")
def disk_image(tmp_path_factory) -> Path:
    """5 MiB + a ragged tail: data runs across sub-block and chunk edges, zeros between them."""
    path = tmp_path_factory.mktemp("shreader") / "disk.img"
    size = 5 * MiB + 3 * SUB + 1000
    with path.open("wb") as image:
        image.truncate(size)
        for offset, length in (
            (0, 4096),
            (70_000, 200_000),
            (MiB, 3 * SUB),
            (3 * MiB + 5, MiB),
            (size - 900, 900),
        ):
            image.seek(offset)
            image.write(os.urandom(length))
    return path


def python_stream(device: Path, start: int, segment: int, free_arg: str) -> bytes:
    argv = ["python3", "-c", copy_mod.SOURCE_READER, str(device), str(start), str(segment), free_arg]
    return subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout


def sh_stream(shell: list[str], device: Path, start: int, segment: int, free_arg: str, env=None):
    argv = [*shell, "-c", copy_mod.SH_READER, "p2v-reader", str(device), str(start), str(segment)]
    argv += [str(device.stat().st_size), copy_mod.sub_block_free_arg(free_arg)]
    return subprocess.run(argv, capture_output=True, timeout=120, check=False, env=env)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "free_arg",
    [
        "",
        f"{SUB}+{2 * SUB},{3 * MiB}+{MiB}",  # free sub-blocks inside data, and a whole free chunk
        f"{MiB}+{SUB},{MiB + SUB}+{2 * SUB}",  # adjacent ranges covering the data of one chunk
    ],
)
@pytest.mark.parametrize("start", [0, 2 * MiB])  # a fresh copy and a resume at a checkpoint
def test_sh_reader_writes_the_python_readers_stream(shell, free_arg, start, disk_image):
    expected = python_stream(disk_image, start, 2 * MiB, free_arg)
    done = sh_stream(shell, disk_image, start, 2 * MiB, free_arg)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
    records = list(copy_mod.read_records(_reader(done.stdout)))
    assert [r for r in records if r[0] == b"S"], "no segment digests in the stream"


def _reader(stream: bytes):
    view = memoryview(stream)
    pos = [0]

    def read_exact(size: int) -> bytes:
        data = view[pos[0] : pos[0] + size].tobytes()
        if len(data) != size:
            raise AssertionError(f"stream ended at {pos[0]}, wanted {size} more bytes")
        pos[0] += size
        return data

    _size, start = copy_mod.read_header(read_exact)
    assert start == 0 or start % MiB == 0
    return read_exact


def test_free_sub_blocks_are_never_sent(disk_image):
    """The data at [MiB, MiB + 3 sub-blocks) reported free: the stream carries none of it."""
    shell = ["dash"] if shutil.which("dash") else ["sh"]
    done = sh_stream(shell, disk_image, 0, 2 * MiB, f"{MiB}+{3 * SUB}")
    assert done.returncode == 0, done.stderr
    sent = [(o, len(d)) for kind, o, d in copy_mod.read_records(_reader(done.stdout)) if kind == b"D"]
    assert sent, "nothing sent at all"
    assert all(o + n <= MiB or o >= MiB + 3 * SUB for o, n in sent), sent


def test_free_ranges_round_inwards_to_whole_sub_blocks():
    # 1 byte past a boundary, a range shorter than a sub-block, and two that touch after rounding.
    free_arg = f"1+{3 * SUB},{10 * SUB + 7}+100,{20 * SUB}+{2 * SUB},{22 * SUB}+{SUB + 5}"
    assert copy_mod.sub_block_free_arg(free_arg) == "1+2,20+3"
    assert copy_mod.sub_block_free_arg("") == ""


def test_a_missing_tool_is_named(disk_image, tmp_path):
    """A source whose sha256sum is missing: exit status and message say which tool."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dd", "cmp", "split", "tr", "wc", "mktemp", "rm", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    shell = shutil.which("dash") or shutil.which("sh")
    done = sh_stream([shell], disk_image, 0, 2 * MiB, "", env={"PATH": str(bin_dir)})
    assert done.returncode == 4
    assert b"sha256sum is missing on the source" in done.stderr
    assert done.stdout == b""


@pytest.fixture(scope="module")
def small_standin():
    """A stand-in with a 256 MiB disk of which about 40 MiB is used (sshd in its own namespace)."""
    need_standin_tools()
    machine = start_standin(firmware="bios", disk_size_bytes=256 * MiB, used_bytes=40 * MiB)
    try:
        yield machine
    finally:
        machine.close()


@pytest.mark.libvirt
@pytest.mark.standin
def test_sh_reader_copies_over_ssh_into_a_volume(small_standin, libvirt_conn, p2v_pool, p2v_prefix):
    used = allocated_bytes(small_standin.image_path)
    vol = new_volume(p2v_pool, f"{p2v_prefix}shreader.raw", small_standin.disk_size_bytes)
    endpoint = standin_endpoint(small_standin)
    try:
        progress = copy_mod.copy_disk(
            lambda: ssh.connect(endpoint).client,
            small_standin.loop_device,
            libvirt_conn,
            vol,
            small_standin.disk_size_bytes,
            reader=copy_mod.READER_SH,
            openssh=copy_mod.OpenSSHLogin(
                small_standin.address, small_standin.port, small_standin.user, small_standin.private_key
            ),
        )
        assert progress.reader == copy_mod.READER_SH
        copy_mod.verify_volume(libvirt_conn, vol, progress)
        assert progress.wire_bytes <= used * 1.05, (progress.wire_bytes, used)
        assert same_bytes(small_standin.image_path, vol.path()), "volume differs from the source"
    finally:
        vol.delete(0)
