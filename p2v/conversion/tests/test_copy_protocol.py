"""The source reader and the read-back hasher agree: whatever the disk's layout of data, zeros and
holes, the reader's records rebuild the disk exactly, send no zero runs, and the per-segment digests
it sends equal those the target computes when reading the volume back (data + holes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2v.conversion.copy import (
    CHUNK_BYTES,
    SOURCE_READER,
    SUB_BLOCK_BYTES,
    _ReadbackHasher,
    read_header,
    read_records,
)

SEGMENT_BYTES = 2 * CHUNK_BYTES

extents = st.lists(
    st.tuples(
        st.integers(0, 6 * CHUNK_BYTES), st.integers(1, 300_000), st.sampled_from([b"\x00", b"x", b"r"])
    ),
    max_size=8,
)


def run_reader(path: str, start: int = 0) -> bytes:
    done = subprocess.run(
        [sys.executable, "-c", SOURCE_READER, path, str(start), str(SEGMENT_BYTES)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def build_disk(path: str, size: int, layout: list[tuple[int, int, bytes]]) -> bytes:
    image = bytearray(size)
    with open(path, "wb") as handle:
        handle.truncate(size)  # sparse: everything not written is a hole
        for offset, length, fill in layout:
            offset %= size
            length = min(length, size - offset)
            data = os.urandom(length) if fill == b"r" else fill * length
            handle.seek(offset)
            handle.write(data)
            image[offset : offset + length] = data
    return bytes(image)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size_chunks=st.integers(1, 7), tail=st.integers(0, CHUNK_BYTES - 1), layout=extents)
# A disk whose size is not a multiple of 64 KiB, with data in its last partial block (a bug once).
@example(size_chunks=1, tail=1000, layout=[(CHUNK_BYTES, 1000, b"r")])
def test_reader_rebuilds_the_disk_sends_no_zeros_and_digests_match_read_back(
    tmp_path, size_chunks, tail, layout
):
    size = size_chunks * CHUNK_BYTES + tail
    path = str(tmp_path / "disk.img")
    original = build_disk(path, size, layout)
    stream = io.BytesIO(run_reader(path))
    assert read_header(stream.read) == (size, 0)
    rebuilt = bytearray(size)
    digests = {}
    data_bytes = 0
    for kind, offset, payload in read_records(stream.read):
        if kind == b"D":
            assert any(
                payload[i : i + SUB_BLOCK_BYTES].strip(b"\0") for i in range(0, len(payload), SUB_BLOCK_BYTES)
            )
            rebuilt[offset : offset + len(payload)] = payload
            data_bytes += len(payload)
        else:
            digests[offset] = payload.hex()
    assert bytes(rebuilt) == original
    nonzero_blocks = sum(
        1 for i in range(0, size, SUB_BLOCK_BYTES) if original[i : i + SUB_BLOCK_BYTES].strip(b"\0")
    )
    assert data_bytes <= nonzero_blocks * SUB_BLOCK_BYTES  # zero 64 KiB blocks never cross
    # The target reads the volume back as data and holes (here: data where non-zero, holes elsewhere).
    hasher = _ReadbackHasher(size, SEGMENT_BYTES)
    pos = 0
    for i in range(0, size, SUB_BLOCK_BYTES):
        block = original[i : i + SUB_BLOCK_BYTES]
        if block.strip(b"\0"):
            if i > pos:
                hasher.hole(i - pos)
            hasher.data(block)
            pos = i + len(block)
    if size > pos:
        hasher.hole(size - pos)
    assert hasher.segments == digests


def test_reader_resumes_at_a_checkpoint(tmp_path):
    path = str(tmp_path / "disk.img")
    original = build_disk(path, 5 * CHUNK_BYTES, [(0, 5 * CHUNK_BYTES, b"r")])
    stream = io.BytesIO(run_reader(path, start=SEGMENT_BYTES))
    assert read_header(stream.read) == (len(original), SEGMENT_BYTES)
    records = list(read_records(stream.read))
    assert min(offset for kind, offset, _ in records if kind == b"D") == SEGMENT_BYTES
    assert [offset for kind, offset, _ in records if kind == b"S"] == [2 * SEGMENT_BYTES, len(original)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=extents,
    free=st.lists(st.tuples(st.integers(0, 6 * CHUNK_BYTES), st.integers(1, 3 * CHUNK_BYTES)), max_size=5),
)
def test_free_ranges_are_neither_sent_nor_break_the_read_back_digests(tmp_path, layout, free):
    """Ranges a filesystem reports free count as zeros: none of their bytes cross, everything else is
    rebuilt exactly, and the digests match a volume that has holes there."""
    size = 6 * CHUNK_BYTES + 12345
    path = str(tmp_path / "disk.img")
    original = bytearray(build_disk(path, size, layout))
    merged: list[list[int]] = []
    for start, length in sorted((s % size, min(n, size - s % size)) for s, n in free):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + length)
        else:
            merged.append([start, start + length])
    expected = bytearray(original)
    for start, end in merged:
        expected[start:end] = bytes(end - start)
    arg = ",".join(f"{start}+{end - start}" for start, end in merged)
    done = subprocess.run(
        [sys.executable, "-c", SOURCE_READER, path, "0", str(SEGMENT_BYTES), arg],
        capture_output=True,
        timeout=60,
        check=True,
    )
    stream = io.BytesIO(done.stdout)
    read_header(stream.read)
    rebuilt = bytearray(size)
    digests = {}
    for kind, offset, payload in read_records(stream.read):
        if kind == b"D":
            for start, end in merged:  # no byte of a free range crosses the wire
                assert (
                    offset + len(payload) <= start
                    or offset >= end
                    or not payload[max(start - offset, 0) : end - offset].strip(b"\0")
                )
            rebuilt[offset : offset + len(payload)] = payload
        else:
            digests[offset] = payload.hex()
    assert rebuilt == expected
    hasher = _ReadbackHasher(size, SEGMENT_BYTES)
    pos = 0
    for i in range(0, size, SUB_BLOCK_BYTES):
        block = bytes(expected[i : i + SUB_BLOCK_BYTES])
        if block.strip(b"\0"):
            if i > pos:
                hasher.hole(i - pos)
            hasher.data(block)
            pos = i + len(block)
    if size > pos:
        hasher.hole(size - pos)
    assert hasher.segments == digests


DUMPE2FS = """Filesystem volume name:   root
Block count:              475136
Free blocks:              250000
Block size:               4096

Group 0: (Blocks 0-32767) csum 0x1234 [ITABLE_ZEROED]
  Primary superblock at 0, Group descriptors at 1-1
  Block bitmap at 2 (+2)
  20000 free blocks, 8181 free inodes, 2 directories, 8181 unused inodes
  Free blocks: 12768-32767
  Free inodes: 12-8192
Group 1: (Blocks 32768-65535) csum 0x5678 [INODE_UNINIT, ITABLE_ZEROED]
  1 free blocks, 8192 free inodes, 0 directories, 8192 unused inodes
  Free blocks: 40000, 50000-50009
  Free inodes: 8193-16384
Group 2: (Blocks 65536-98303) [INODE_UNINIT, ITABLE_ZEROED]
  0 free blocks, 8192 free inodes, 0 directories, 8192 unused inodes
  Free blocks:
  Free inodes: 16385-24576
"""


def test_dumpe2fs_free_blocks_are_parsed_per_group():
    from p2v.conversion.usedblocks import parse_dumpe2fs_free

    assert parse_dumpe2fs_free(DUMPE2FS) == (4096, [(12768, 20000), (40000, 1), (50000, 10)])
