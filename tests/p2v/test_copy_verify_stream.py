"""`verify_volume` compares what the volume holds with the source's digests, without libvirtd.

The source digests come from the real source reader (SOURCE_READER, run here with python3 on a
disk image file, exactly the program the copy runs over SSH). The volume side is a crafted
stand-in for libvirt's sparse download stream (the `test:///default` driver cannot download
volumes, and libvirtd needs root): it plays back an image's bytes as data and holes. So a copy
that dropped the digest comparison, or miscounted holes, fails here in a fraction of a second.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from p2v.conversion import copy as disk_copy
from p2v.conversion.libvirt_binding import AVAILABLE

CHUNK = disk_copy.CHUNK_BYTES
SEGMENT = 2 * CHUNK


@pytest.fixture(autouse=True)
def _libvirt_constants(monkeypatch):
    # verify_volume reads two names off the binding; without it (a laptop) give it those two.
    if not AVAILABLE:
        monkeypatch.setattr(disk_copy, "libvirt", SimpleNamespace(
            VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM=1, libvirtError=RuntimeError))


def make_image(path: Path) -> bytes:
    """5 MiB + 4 KiB (the last chunk and segment are short): data, a whole zero chunk, a zero
    run inside a data chunk, data at the very end."""
    image = bytearray(5 * CHUNK + 4096)
    image[0:70_000] = bytes(range(256)) * 273 + bytes(70_000 - 256 * 273)
    image[100:200] = b"\x07" * 100
    # chunk 1 stays all zero; chunk 2 has data on both sides of a 64 KiB hole
    image[2 * CHUNK + 10: 2 * CHUNK + 5000] = b"\xab" * 4990
    image[2 * CHUNK + 200_000: 2 * CHUNK + 300_000] = b"\xcd" * 100_000
    image[-50:] = b"\xee" * 50
    path.write_bytes(bytes(image))
    return bytes(image)


def source_progress(path: Path, size: int) -> disk_copy.CopyProgress:
    """The digests the real source reader reports for the image (start 0, 2-chunk segments)."""
    out = subprocess.run([sys.executable, "-c", disk_copy.SOURCE_READER, str(path), "0", str(SEGMENT)],
                         capture_output=True, check=True, timeout=120).stdout
    read_exact = io.BytesIO(out).read
    assert disk_copy.read_header(read_exact) == (size, 0)
    progress = disk_copy.CopyProgress(disk="vda", size_bytes=size, segment_bytes=SEGMENT)
    for kind, end, payload in disk_copy.read_records(read_exact):
        if kind == b"S":
            progress.segment_digests[end] = payload.hex()
    return progress


class PlaybackStream:
    """Plays `content` back like a sparse libvirt download: runs of zeros become holes."""

    def __init__(self, content: bytes, piece: int = 48 * 1024):
        self.content, self.piece = content, piece
        self.finished = False

    def sparseRecvAll(self, on_data, on_hole, opaque):
        pos = 0
        while pos < len(self.content):
            part = self.content[pos: pos + self.piece]
            if part.count(0) == len(part):
                on_hole(self, len(part), opaque)
            else:
                on_data(self, part, opaque)
            pos += len(part)

    def finish(self):
        self.finished = True

    def abort(self):
        raise AssertionError("a successful read-back is not aborted")


class PlaybackVolume:
    def __init__(self, content: bytes):
        self.content = content
        self.requested = None

    def download(self, stream, offset, length, flags):
        self.requested = (offset, length, flags)
        stream.content = self.content


class PlaybackConnection:
    def newStream(self, flags):
        return PlaybackStream(b"")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "disk.img"
    content = make_image(path)
    return content, source_progress(path, len(content))


def verify(content: bytes, progress: disk_copy.CopyProgress) -> PlaybackVolume:
    volume = PlaybackVolume(content)
    disk_copy.verify_volume(PlaybackConnection(), volume, progress)
    return volume


def test_the_source_reader_reports_one_digest_per_segment(image):
    content, progress = image
    assert sorted(progress.segment_digests) == [2 * CHUNK, 4 * CHUNK, len(content)]


def test_an_identical_volume_verifies(image):
    content, progress = image
    volume = verify(content, progress)
    assert volume.requested == (0, len(content), disk_copy.libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)


@pytest.mark.parametrize("offset", [150, CHUNK + 7, 2 * CHUNK + 250_000, 5 * CHUNK + 4000],
                         ids=["data-byte", "zero-chunk-gets-data", "inside-a-run", "short-tail"])
def test_one_changed_byte_on_the_volume_is_a_checksum_mismatch(image, offset):
    content, progress = image
    corrupted = bytearray(content)
    corrupted[offset] ^= 0x01
    segment_end = min(len(content), (offset // SEGMENT + 1) * SEGMENT)
    expected = rf"vda: checksum mismatch in segments ending at \[{segment_end}\]"
    with pytest.raises(disk_copy.CopyError, match=expected):
        verify(bytes(corrupted), progress)


def test_data_zeroed_on_the_volume_is_a_checksum_mismatch(image):
    content, progress = image
    lost = bytearray(content)
    lost[2 * CHUNK + 200_000: 2 * CHUNK + 300_000] = bytes(100_000)  # a run that never arrived
    with pytest.raises(disk_copy.CopyError, match=rf"segments ending at \[{4 * CHUNK}\]"):
        verify(bytes(lost), progress)


def test_a_wrong_source_digest_is_a_checksum_mismatch(image):
    content, progress = image
    wrong = disk_copy.CopyProgress(disk="vda", size_bytes=progress.size_bytes, segment_bytes=SEGMENT,
                                   segment_digests=dict(progress.segment_digests))
    wrong.segment_digests[len(content)] = "0" * 64
    with pytest.raises(disk_copy.CopyError, match=rf"segments ending at \[{len(content)}\]"):
        verify(content, wrong)


def test_a_short_volume_is_refused_with_both_sizes(image):
    content, progress = image
    expected = rf"read back {len(content) - CHUNK} bytes, expected {len(content)}"
    with pytest.raises(disk_copy.CopyError, match=expected):
        verify(content[:-CHUNK], progress)


def test_a_segment_without_a_source_digest_is_refused(image):
    content, progress = image
    partial = disk_copy.CopyProgress(disk="vda", size_bytes=progress.size_bytes, segment_bytes=SEGMENT,
                                     segment_digests=dict(progress.segment_digests))
    del partial.segment_digests[2 * CHUNK]
    with pytest.raises(disk_copy.CopyError, match=rf"missing source digests: \[{2 * CHUNK}\]"):
        verify(content, partial)
