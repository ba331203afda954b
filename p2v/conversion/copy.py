"""Copy a source disk over SSH into a libvirt storage volume, moving only the data that is used.

A small reader runs on the source (python3, read-only `os.open(O_RDONLY)`), walks the disk in
1 MiB chunks (skipping holes with SEEK_DATA where the device supports it), and emits only non-zero
64 KiB runs. The target side feeds them to `vol.upload` as a *sparse* stream: zero ranges become
holes, so the volume's allocation stays close to the used data. The disk is cut into segments;
after each segment the reader sends a digest of that segment and the upload stream is finished,
which makes the segment a checkpoint: after a broken connection the copy resumes at the last
checkpoint and nothing that arrived before it crosses the wire again. At the end the volume is read
back (sparse download) and every segment's digest is compared with the source's.

paramiko starts a client-side rekey after 512 MiB that can time out against sshd
(PLATFORM-NOTES), so the transport's rekey limits are raised and the server drives rekeying.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import select
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko

from p2v.ssh import Privilege

from .libvirt_binding import libvirt

CHUNK_BYTES = 1 << 20
SUB_BLOCK_BYTES = 1 << 16
DEFAULT_SEGMENT_BYTES = 32 * CHUNK_BYTES
ZERO_CHUNK_DIGEST = b"\0" * 32
MAGIC = b"P2VR"
HEADER = struct.Struct(">QQ")  # disk size, start offset
DATA = struct.Struct(">QI")  # offset, length (then the bytes)
SEGMENT = struct.Struct(">Q32s")  # segment end, sha256 over the segment's chunk digests
REKEY_NEVER = 1 << 62
SSH_WINDOW_BYTES = 32 << 20
ZERO_CHUNK = bytes(CHUNK_BYTES)
READ_TIMEOUT_S = 60.0
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 1 << 20
READ_BUFFER_BYTES = 8 << 20

# Runs on the source with python3 (3.5+). Only reads: O_RDONLY, pread. argv: device, start, segment.
SOURCE_READER = r"""
import errno, fcntl, hashlib, os, struct, sys
dev, pos, seg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# argv[4] (optional): "start+length,..." byte ranges a filesystem reports free: never sent, they
# count as zeros (on the volume they are holes, so the read-back digests agree).
FREE = [tuple(int(x) for x in r.split("+")) for r in sys.argv[4].split(",") if r] if len(sys.argv) > 4 else []
FREE = [(a, a + n) for a, n in sorted(FREE)]
fi = 0
CH, SUB = %(chunk)d, %(sub)d
out = sys.stdout.buffer
try:  # a bigger pipe to sshd: fewer wake-ups on both sides (a socket or an old kernel: no matter)
    fcntl.fcntl(1, 1031, 1 << 20)
except (OSError, ValueError):
    pass
fd = os.open(dev, os.O_RDONLY)
size = os.lseek(fd, 0, os.SEEK_END)
ZERO, ZSUB, ZD = bytes(CH), bytes(SUB), bytes(32)
out.write(b"P2VR" + struct.pack(">QQ", size, pos))
seek_data = getattr(os, "SEEK_DATA", None)
while pos < size:
    seg_end = min(size, (pos // seg + 1) * seg)
    digests = hashlib.sha256()
    while pos < seg_end:
        n = min(CH, seg_end - pos)
        nxt = pos
        if seek_data is not None:
            try:
                nxt = os.lseek(fd, pos, seek_data)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    nxt = size
                else:  # the device cannot tell (block devices): read everything
                    seek_data = None
        if nxt >= pos + n:
            digests.update(ZD)
            pos += n
            continue
        while fi < len(FREE) and FREE[fi][1] <= pos:
            fi += 1
        if fi < len(FREE) and FREE[fi][0] <= pos and FREE[fi][1] >= pos + n:
            digests.update(ZD)  # wholly free: not even read
            pos += n
            continue
        chunk = os.pread(fd, n, pos)
        if len(chunk) != n:
            raise SystemExit("short read at %%d" %% pos)
        j = fi
        while j < len(FREE) and FREE[j][0] < pos + n:
            a, b = max(FREE[j][0], pos) - pos, min(FREE[j][1], pos + n) - pos
            chunk = chunk[:a] + ZERO[: b - a] + chunk[b:]
            j += 1
        if chunk == ZERO[:n]:
            digests.update(ZD)
            pos += n
            continue
        digests.update(hashlib.sha256(chunk).digest())
        run_start = None
        view = memoryview(chunk)
        for off in range(0, n + SUB, SUB):
            zero = off >= n or chunk.startswith(ZSUB[:min(SUB, n - off)], off)
            if not zero and run_start is None:
                run_start = off
            elif zero and run_start is not None:
                end = min(off, n)
                out.write(b"D" + struct.pack(">QI", pos + run_start, end - run_start))
                out.write(view[run_start:end])
                run_start = None
        pos += n
    out.write(b"S" + struct.pack(">Q32s", seg_end, digests.digest()))
    out.flush()
out.write(b"E")
out.flush()
""" % {"chunk": CHUNK_BYTES, "sub": SUB_BLOCK_BYTES}  # noqa: UP031 (the program's own braces stay literal)


# The fallback for a source without python3: POSIX sh with dd, split, tr, wc, mktemp and
# sha256sum (coreutils or busybox), no helper binary to upload. It writes the same stream as
# SOURCE_READER (header, "D" runs of non-zero 64 KiB sub-blocks, "S" segment digests over the
# per-chunk sha256, "E"), so the host side stays one implementation. Free space arrives in whole
# 64 KiB sub-blocks (the host rounds the free ranges inwards): a sub-block the filesystems report
# free is never sent and counts as zeros. Processes per used chunk: about 5 (dd, split, one
# sha256sum over the chunk and its sub-blocks, whose digests also tell the zero ones, cat per run);
# wholly free chunks cost none. argv: device, start (chunk-aligned), segment,
# device size, free "first+count" in sub-blocks. Scratch files (2 MiB) live in a mktemp directory
# in /dev/shm (else $TMPDIR or /tmp), removed on exit.
SH_READER = r"""
dev=$1 pos=$2 seg=$3 size=$4 free=$5
CH=%(chunk)d SUB=%(sub)d
for tool in dd split tr wc mktemp sha256sum; do
  command -v $tool >/dev/null 2>&1 || { echo "p2v sh reader: $tool is missing on the source" >&2; exit 4; }
done
# Scratch space in RAM when there is a tmpfs: not on the filesystems being copied.
T=$(mktemp -d /dev/shm/p2v-reader.XXXXXX 2>/dev/null ||
  mktemp -d "${TMPDIR:-/tmp}/p2v-reader.XXXXXX") || exit 5
trap 'rm -rf "$T"' EXIT
trap 'exit 6' HUP INT TERM PIPE
dd if=/dev/zero of="$T/z" bs=$SUB count=1 2>/dev/null || exit 5
dd if=/dev/zero of="$T/Z" bs=$CH count=1 2>/dev/null || exit 5
[ -r "$dev" ] || { echo "p2v sh reader: cannot read $dev" >&2; exit 7; }
oct() { B="\\$(( $1 / 64 ))$(( $1 / 8 %% 8 ))$(( $1 %% 8 ))"; }
be() { # $1 as $2 big-endian bytes, as printf escapes in E
  E=; i=$(( ($2 - 1) * 8 ))
  while [ $i -ge 0 ]; do oct $(( ($1 >> i) & 255 )); E=$E$B; i=$((i - 8)); done
}
hexbin() { E=; h=$1; while [ -n "$h" ]; do r=${h#??}; oct $(( 0x${h%%"$r"} )); E=$E$B; h=$r; done; }
NONE=4611686018427387904
fs=-1 fe=-1
skip_free() { # the free range (fs, fe] holding or following sub-block $1
  while [ $fe -le $1 ]; do
    if [ -z "$free" ]; then fs=$NONE fe=$NONE; return; fi
    r=${free%%%%,*}; case $free in *,*) free=${free#*,} ;; *) free= ;; esac
    fs=${r%%+*} fe=$(( ${r%%+*} + ${r#*+} ))
  done
}
is_zero() { [ "$(tr -d '\000' < "$1" | wc -c)" -eq 0 ]; }  # a short last sub-block
ZD=; k=0; while [ $k -lt 32 ]; do ZD="$ZD\\000"; k=$((k + 1)); done
set -- $(sha256sum "$T/z" "$T/Z") && ZH_SUB=$1 ZH_CHUNK=$3
printf P2VR; be $size 8; printf "$E"; be $pos 8; printf "$E"
while [ $pos -lt $size ]; do
  seg_end=$(( (pos / seg + 1) * seg )); [ $seg_end -gt $size ] && seg_end=$size
  D=
  while [ $pos -lt $seg_end ]; do
    n=$CH; [ $((seg_end - pos)) -lt $n ] && n=$((seg_end - pos))
    sb=$((pos / SUB)) ns=$(( (n + SUB - 1) / SUB ))
    skip_free $sb
    if [ $fs -le $sb ] && [ $fe -ge $((sb + ns)) ]; then D=$D$ZD; pos=$((pos + n)); continue; fi
    dd if="$dev" of="$T/c" bs=$CH skip=$((pos / CH)) count=1 2>/dev/null ||
      { echo "p2v sh reader: read error at $pos" >&2; exit 8; }
    [ $n -eq $CH ] || rm -f "$T"/s??
    split -b $SUB -a 2 "$T/c" "$T/s" || exit 8
    # One sha256sum for the chunk and its sub-blocks: a zero block is known by its digest.
    set -- $(sha256sum "$T/c" "$T"/s??)
    [ $# -eq $((2 * ns + 2)) ] || { echo "p2v sh reader: short read at $pos" >&2; exit 8; }
    ch=$1; shift 2
    if [ $n -eq $CH ] && [ "$ch" = "$ZH_CHUNK" ]; then D=$D$ZD; pos=$((pos + n)); continue; fi
    k=0 run= runat=0 parts= anyfree= anydata=
    while [ $# -gt 0 ]; do
      h=$1 f=$2; shift 2
      len=$SUB; [ $(( (k + 1) * SUB )) -gt $n ] && len=$((n - k * SUB))
      skip_free $((sb + k))
      zero=
      if [ $fs -le $((sb + k)) ]; then
        zero=1 anyfree=1
        if [ $len -eq $SUB ]; then parts="$parts $T/z"
        else dd if=/dev/zero of="$T/zs" bs=$len count=1 2>/dev/null; parts="$parts $T/zs"; fi
      else
        parts="$parts $f"
        if [ $len -eq $SUB ]; then [ "$h" = "$ZH_SUB" ] && zero=1; else is_zero "$f" $len && zero=1; fi
      fi
      if [ -z "$zero" ]; then
        anydata=1; [ -z "$run" ] && runat=$((pos + k * SUB)) runlen=0
        run="$run $f" runlen=$((runlen + len))
      elif [ -n "$run" ]; then
        printf D; be $runat 8; printf "$E"; be $runlen 4; printf "$E"; cat $run; run=
      fi
      k=$((k + 1))
    done
    if [ -n "$run" ]; then printf D; be $runat 8; printf "$E"; be $runlen 4; printf "$E"; cat $run; fi
    if [ -z "$anydata" ]; then D=$D$ZD
    elif [ -z "$anyfree" ]; then hexbin $ch; D=$D$E
    else set -- $(cat $parts | sha256sum) && hexbin $1; D=$D$E
    fi
    pos=$((pos + n))
  done
  set -- $(printf "$D" | sha256sum) && hexbin $1
  DG=$E; be $seg_end 8; printf "S$E$DG"
done
printf E
""" % {"chunk": CHUNK_BYTES, "sub": SUB_BLOCK_BYTES}  # noqa: UP031 (the script's own braces stay literal)
READER_PYTHON = "python3"
READER_SH = "sh"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long a broken copy keeps trying: exponential backoff, given up only after a quiet window.

    A source that reboots during the copy is unreachable for minutes (firmware, disk checks, sshd
    starting), so the copy waits `initial_delay_s`, doubling up to `max_delay_s`, and gives up only
    when `window_s` seconds pass without the copy moving its checkpoint forward. Each checkpoint
    reached resets the window, so a long copy with a few short breaks never runs out of retries.
    """

    initial_delay_s: float = 2.0
    max_delay_s: float = 60.0
    window_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("initial_delay_s", "max_delay_s", "window_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"RetryPolicy.{name} must be a positive number of seconds, got {value!r}")
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError(
                f"RetryPolicy.max_delay_s ({self.max_delay_s}) is below "
                f"initial_delay_s ({self.initial_delay_s})"
            )

    def delay_s(self, failures_in_a_row: int) -> float:
        """The wait before the next attempt after `failures_in_a_row` (1, 2, ...) failures."""
        return min(self.max_delay_s, self.initial_delay_s * 2 ** max(0, failures_in_a_row - 1))


class CopyError(RuntimeError):
    """The copy cannot complete (names the disk and what went wrong)."""


class ConnectionBroken(CopyError):
    """The SSH stream ended early; the copy can resume from the last checkpoint."""


@dataclasses.dataclass
class CopyProgress:
    disk: str
    size_bytes: int
    checkpoint: int = 0  # every byte before this offset is on the volume (segment finished)
    position: int = 0  # how far the source reader has got
    wire_bytes: int = 0  # bytes received over SSH (payload, all attempts)
    data_bytes: int = 0  # non-zero bytes written to the volume (all attempts)
    resent_bytes: int = 0  # data bytes that had to cross again after a break
    resumes: int = 0
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_digests: dict[int, str] = dataclasses.field(default_factory=dict)  # seg end -> hex
    reader: str = READER_PYTHON  # which source reader ran: READER_PYTHON or READER_SH (no python3)
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def percent(self) -> float:
        return 100.0 * self.position / self.size_bytes if self.size_bytes else 100.0

    @property
    def rate_bytes_per_s(self) -> float:
        elapsed = time.monotonic() - self.started_at
        return self.wire_bytes / elapsed if elapsed > 0 else 0.0


ProgressCallback = Callable[[CopyProgress], None]


def disable_client_rekey(transport: paramiko.Transport) -> None:
    """Let the server drive rekeying: paramiko's own rekey after 512 MiB can time out."""
    packetizer = transport.packetizer
    packetizer.REKEY_BYTES = REKEY_NEVER
    packetizer.REKEY_PACKETS = REKEY_NEVER
    packetizer.REKEY_BYTES_OVERFLOW_MAX = REKEY_NEVER
    packetizer.REKEY_PACKETS_OVERFLOW_MAX = REKEY_NEVER


class _ChannelReader:
    """Exact-size reads from a paramiko channel, counting every byte that crossed the wire."""

    def __init__(self, channel: paramiko.Channel, progress: CopyProgress):
        self.channel = channel
        self.progress = progress
        self.buffer = bytearray()
        self.offset = 0  # bytes of `buffer` already returned

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) - self.offset < size:
            try:
                got = self.channel.recv(max(1 << 20, size - len(self.buffer) + self.offset))
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise ConnectionBroken(f"SSH stream broke: {exc}") from exc
            if not got:
                raise ConnectionBroken(self._ended_reason())
            self.progress.wire_bytes += len(got)
            if self.offset:  # drop what was consumed once, not on every small read
                del self.buffer[: self.offset]
                self.offset = 0
            self.buffer += got
        data = bytes(self.buffer[self.offset : self.offset + size])
        self.offset += size
        return data

    def _ended_reason(self) -> str:
        err = b""
        try:
            while self.channel.recv_stderr_ready():
                err += self.channel.recv_stderr(65536)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        status = self.channel.exit_status if self.channel.exit_status_ready() else None
        message = err.decode(errors="replace").strip()[-500:]
        if status == 127:
            raise CopyError(f"the source reader could not start (exit 127, command not found): {message}")
        if status not in (None, -1) and status != 0:
            raise CopyError(f"source reader exited with status {status}: {message or 'no message'}")
        return f"SSH stream ended early (exit status {status}){': ' + message if message else ''}"


def _open_reader(
    ssh: paramiko.SSHClient,
    device: str,
    start: int,
    segment_bytes: int,
    progress: CopyProgress,
    free_arg: str = "",
    privilege: Privilege | None = None,
) -> _ChannelReader:
    transport = ssh.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionBroken("SSH transport is not active")
    disable_client_rekey(transport)
    # A large window lets paramiko's transport thread read ahead while we block in vol.upload.
    channel = transport.open_session(window_size=SSH_WINDOW_BYTES, timeout=30)
    channel.settimeout(READ_TIMEOUT_S)
    command = _reader_command(device, start, segment_bytes, free_arg, privilege, progress)
    channel.exec_command(command)
    stdin = privilege.stdin() if privilege is not None else None
    if stdin:
        channel.sendall(stdin)  # sudo -S reads the password first; the reader never reads stdin
    channel.shutdown_write()
    return _ChannelReader(channel, progress)


def _reader_command(
    device: str,
    start: int,
    segment_bytes: int,
    free_arg: str,
    privilege: Privilege | None,
    progress: CopyProgress,
) -> str:
    """The reader's command line on the source, through sudo when the login user is not root."""
    if progress.reader == READER_SH:
        argv = ("sh", "-c", SH_READER, "p2v-reader", device, str(start), str(segment_bytes))
        argv += (str(progress.size_bytes), sub_block_free_arg(free_arg))
    else:
        argv = ("python3", "-c", SOURCE_READER, device, str(start), str(segment_bytes), free_arg)
    command = " ".join(shlex.quote(a) for a in argv)
    return privilege.wrap(command) if privilege is not None else command


def sub_block_free_arg(free_arg: str) -> str:
    """Byte ranges "start+length,..." → the whole SUB_BLOCK_BYTES sub-blocks inside them, as
    "first+count,..." (what the sh reader takes), adjacent ones merged. Rounding inwards only ever
    sends a free byte, never skips a used one."""
    blocks: list[list[int]] = []
    for part in filter(None, free_arg.split(",")):
        start, length = (int(x) for x in part.split("+"))
        first = -(-start // SUB_BLOCK_BYTES)
        end = (start + length) // SUB_BLOCK_BYTES
        if end <= first:
            continue
        if blocks and blocks[-1][1] >= first:
            blocks[-1][1] = max(blocks[-1][1], end)
        else:
            blocks.append([first, end])
    return ",".join(f"{first}+{end - first}" for first, end in blocks)


def reader_description(progress: CopyProgress) -> str:
    """Which source reader moved the data, for the job's log."""
    if progress.reader == READER_SH:
        return "read by the sh + dd fallback reader (the source has no usable python3)"
    return "read by the python3 reader"


PYTHON3_PROBE = "command -v python3 >/dev/null 2>&1 && python3 -c 'import hashlib, os, struct' && echo yes"


def choose_reader(ssh: paramiko.SSHClient) -> str:
    """READER_PYTHON when the source has a working python3, else READER_SH (the sh + dd fallback)."""
    _, stdout, _ = ssh.exec_command(PYTHON3_PROBE, timeout=60)
    return READER_PYTHON if stdout.read().strip() == b"yes" else READER_SH


@dataclasses.dataclass(frozen=True)
class OpenSSHLogin:
    """How the OpenSSH client logs in for the bulk stream (the host key comes from the verified
    paramiko session, never from the network unchecked)."""

    address: str
    port: int
    user: str
    private_key: str


class _ProcessReader:
    """Exact-size reads from the stdout of an `ssh` client process, counting every byte.

    Reads go into one preallocated buffer (readv) from a pipe enlarged to PIPE_BYTES: with the
    default 64 KiB pipe and a fresh bytes object per read, the reads alone cost more CPU than
    the ssh transport on a dense disk."""

    def __init__(self, process: subprocess.Popen, progress: CopyProgress, workdir: Path):
        self.process = process
        self.progress = progress
        self.workdir = workdir
        self.fd = process.stdout.fileno()
        with contextlib.suppress(OSError):  # a smaller pipe only costs speed
            fcntl.fcntl(self.fd, F_SETPIPE_SZ, PIPE_BYTES)
        self.buffer = bytearray(READ_BUFFER_BYTES)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0

    def read_exact(self, size: int) -> bytes:
        while self.end - self.start < size:
            if self.start + size > len(self.buffer):  # no room after start: move the rest to the front
                held = self.end - self.start
                if size > len(self.buffer):
                    self.buffer = bytearray(size) + bytearray(READ_BUFFER_BYTES)
                    self.buffer[:held] = self.view[self.start : self.end]
                    self.view = memoryview(self.buffer)
                else:
                    self.view[:held] = self.view[self.start : self.end]
                self.start, self.end = 0, held
            ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT_S)
            if not ready:
                raise ConnectionBroken(f"no data from the source for {READ_TIMEOUT_S:g} s")
            got = os.readv(self.fd, [self.view[self.end :]])
            if not got:
                raise ConnectionBroken(self._ended_reason())
            self.progress.wire_bytes += got
            self.end += got
        data = self.view[self.start : self.start + size].tobytes()
        self.start += size
        return data

    def _ended_reason(self) -> str:
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            status = None
        message = (
            self.process.stderr.read().decode(errors="replace").strip()[-500:] if status is not None else ""
        )
        if status == 127:
            raise CopyError(f"the source reader could not start (exit 127, command not found): {message}")
        if status not in (None, 0, 255):  # 255: ssh itself lost the connection (retry)
            raise CopyError(f"source reader exited with status {status}: {message or 'no message'}")
        return f"SSH stream ended early (ssh exit status {status}){': ' + message if message else ''}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _open_openssh_reader(
    login: OpenSSHLogin,
    host_key: paramiko.PKey,
    device: str,
    start: int,
    segment_bytes: int,
    progress: CopyProgress,
    free_arg: str = "",
    privilege: Privilege | None = None,
) -> _ProcessReader:
    """The reader behind the OpenSSH client: its C transport moves dense data several times faster
    than paramiko. Key and known_hosts live in a 0700 directory removed when the reader closes."""
    workdir = Path(tempfile.mkdtemp(prefix="p2v-ssh-"))
    key_file = workdir / "id"
    key_file.touch(mode=0o600)
    key_file.write_text(login.private_key if login.private_key.endswith("\n") else login.private_key + "\n")
    known_hosts = workdir / "known_hosts"
    entry = f"{host_key.get_name()} {host_key.get_base64()}"
    known_hosts.write_text(f"{login.address} {entry}\n[{login.address}]:{login.port} {entry}\n")
    command = _reader_command(device, start, segment_bytes, free_arg, privilege, progress)
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-T",
        "-x",
        "-a",
        "-i",
        str(key_file),
        "-p",
        str(login.port),
        "-l",
        login.user,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "LogLevel=ERROR",
        "--",
        login.address,
        command,
    ]
    stdin = privilege.stdin() if privilege is not None else None
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if stdin:
        process.stdin.write(stdin)  # sudo -S's password, through ssh's stdin, never on a command line
        process.stdin.close()
    return _ProcessReader(process, progress, workdir)


def read_header(read_exact: Callable[[int], bytes]) -> tuple[int, int]:
    """(disk size, start offset) from the reader's first bytes."""
    magic = read_exact(len(MAGIC))
    if magic != MAGIC:
        raise CopyError(f"the source reader did not answer with {MAGIC!r} (got {magic!r})")
    size, start = HEADER.unpack(read_exact(HEADER.size))
    return size, start


def read_records(read_exact: Callable[[int], bytes]) -> Iterator[tuple[bytes, int, bytes]]:
    """The reader's records after the header: (b"D", offset, data), (b"S", segment end, digest);
    stops after b"E". Pure protocol parsing, shared by the copy and its tests."""
    while True:
        kind = read_exact(1)
        if kind == b"E":
            return
        if kind == b"D":
            offset, length = DATA.unpack(read_exact(DATA.size))
            if not 0 < length <= CHUNK_BYTES:  # the reader sends runs within one chunk
                raise CopyError(f"the source reader sent a data record of {length} bytes at {offset}")
            yield kind, offset, read_exact(length)
        elif kind == b"S":
            seg_end, digest = SEGMENT.unpack(read_exact(SEGMENT.size))
            yield kind, seg_end, digest
        else:
            raise CopyError(f"unexpected record {kind!r} from the source reader")


def _copy_from(
    reader: _ChannelReader,
    vol: libvirt.virStorageVol,
    stream_factory: Callable[[], libvirt.virStream],
    progress: CopyProgress,
    on_progress: ProgressCallback | None,
    seen_data_until: int,
) -> None:
    size, start = read_header(reader.read_exact)
    if size != progress.size_bytes:
        raise CopyError(f"{progress.disk}: source size {size}, expected {progress.size_bytes}")
    if start != progress.checkpoint:
        raise CopyError(f"{progress.disk}: reader started at {start}, expected {progress.checkpoint}")
    cursor = start
    stream = None
    last_report = 0.0
    try:
        for kind, offset, payload in read_records(reader.read_exact):
            if stream is None:
                stream = stream_factory()
                seg_len = min(size, (cursor // progress.segment_bytes + 1) * progress.segment_bytes) - cursor
                vol.upload(stream, cursor, seg_len, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            if kind == b"D":
                if offset < cursor:
                    raise CopyError(f"{progress.disk}: reader sent data out of order at {offset}")
                if offset > cursor:
                    stream.sendHole(offset - cursor)
                _send_all(stream, payload)
                cursor = offset + len(payload)
                progress.position = cursor
                progress.data_bytes += len(payload)
                if offset < seen_data_until:
                    progress.resent_bytes += min(len(payload), seen_data_until - offset)
            else:  # b"S": the segment is complete; finishing the stream makes it a checkpoint
                if offset > cursor:
                    stream.sendHole(offset - cursor)
                stream.finish()
                stream = None
                cursor = offset
                progress.checkpoint = progress.position = offset
                progress.segment_digests[offset] = payload.hex()
            now = time.monotonic()
            if on_progress and (kind == b"S" or now - last_report > 0.5):
                last_report = now
                on_progress(progress)
    finally:
        if stream is not None:
            with contextlib.suppress(libvirt.libvirtError):  # the original error is what matters
                stream.abort()


def _send_all(stream: libvirt.virStream, data: bytes) -> None:
    while data:
        sent = stream.send(data)
        if sent < 0:
            raise CopyError("libvirt stream refused data")
        data = data[sent:]


def copy_disk(
    open_ssh: Callable[[], paramiko.SSHClient],
    device: str,
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    size_bytes: int,
    *,
    disk_name: str | None = None,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    retry: RetryPolicy | None = None,
    resume: CopyProgress | None = None,
    on_progress: ProgressCallback | None = None,
    retryable: tuple[type[BaseException], ...] = (),
    on_retry: Callable[[CopyProgress, BaseException], None] | None = None,
    openssh: OpenSSHLogin | None = None,
    free_ranges: list[tuple[int, int]] | None = None,
    privilege: Privilege | None = None,
    reader: str | None = None,
) -> CopyProgress:
    """Copy `device` on the source into `vol`; resume at the last checkpoint after a break.

    open_ssh returns a connected, host-key-verified client (p2v.ssh); it is called again after a
    broken connection. With `openssh` (and an `ssh` binary), the data itself streams through the
    OpenSSH client, pinned to the host key that paramiko session verified; otherwise through
    paramiko. A broken connection is retried with `retry`'s backoff and resumes at the last
    checkpoint; CopyError when `retry.window_s` passes without progress or the data is wrong.
    free_ranges: (offset, length) byte ranges of the disk its filesystems report free (see
    p2v.conversion.usedblocks): never read or sent; the volume keeps holes there.
    privilege: how the reader gets root (p2v.ssh.Privilege: sudo for a non-root login); None: as is.
    reader: READER_PYTHON or READER_SH; None: python3 when the source has it (asked once over the
    first session), else the sh + dd fallback. progress.reader says which one ran.
    """
    free_arg = ",".join(f"{start}+{length}" for start, length in sorted(free_ranges or []) if length > 0)
    if reader not in (None, READER_PYTHON, READER_SH):
        raise ValueError(f"reader must be {READER_PYTHON!r} or {READER_SH!r}, got {reader!r}")
    if segment_bytes % CHUNK_BYTES:
        raise ValueError(f"segment_bytes must be a multiple of {CHUNK_BYTES}, got {segment_bytes}")
    progress = resume or CopyProgress(
        disk=disk_name or device, size_bytes=size_bytes, segment_bytes=segment_bytes
    )
    retry = retry or RetryPolicy()
    requested_reader = reader
    reader_chosen = False  # chosen once per copy, then kept across resumes
    attempts = 0
    failures_in_a_row = 0
    seen_data_until = progress.position
    last_checkpoint = progress.checkpoint
    stalled_since = time.monotonic()
    while True:
        attempts += 1
        ssh = None
        reader = None
        try:
            ssh = open_ssh()
            if not reader_chosen:
                progress.reader = requested_reader or choose_reader(ssh)
                reader_chosen = True
            if openssh is not None and shutil.which("ssh"):
                host_key = ssh.get_transport().get_remote_server_key()
                ssh.close()  # the verified key is all the bulk stream needs from this session
                reader = _open_openssh_reader(
                    openssh,
                    host_key,
                    device,
                    progress.checkpoint,
                    segment_bytes,
                    progress,
                    free_arg,
                    privilege,
                )
            else:
                reader = _open_reader(
                    ssh, device, progress.checkpoint, segment_bytes, progress, free_arg, privilege
                )
            _copy_from(reader, vol, lambda: conn.newStream(0), progress, on_progress, seen_data_until)
            break
        except (ConnectionBroken, paramiko.SSHException, OSError, EOFError, *retryable) as exc:
            seen_data_until = max(seen_data_until, progress.position)
            now = time.monotonic()
            if progress.checkpoint > last_checkpoint:  # it moved: a new break, a fresh window
                last_checkpoint, stalled_since, failures_in_a_row = progress.checkpoint, now, 0
            failures_in_a_row += 1
            delay_s = retry.delay_s(failures_in_a_row)
            if now + delay_s - stalled_since > retry.window_s:
                raise CopyError(
                    f"{progress.disk}: gave up after {attempts} attempts, {now - stalled_since:.0f} s "
                    f"without progress (retry window {retry.window_s:g} s) at offset "
                    f"{progress.checkpoint}: {exc}"
                ) from exc
            progress.resumes += 1
            progress.position = progress.checkpoint
            if on_retry:
                on_retry(progress, exc)
            time.sleep(delay_s)  # backoff between attempts, not a wait for an event
        finally:
            if isinstance(reader, _ProcessReader):
                reader.close()
            if ssh is not None:
                ssh.close()
    if on_progress:
        on_progress(progress)
    return progress


class _ReadbackHasher:
    """Recomputes the source reader's per-segment digests from what the volume holds."""

    def __init__(self, size: int, segment_bytes: int):
        self.size, self.segment_bytes = size, segment_bytes
        self.pos = 0
        self.chunk_start = 0
        self.chunk = bytearray()
        self.chunk_has_data = False
        self.segment = hashlib.sha256()
        self.segments: dict[int, str] = {}

    def _boundary(self) -> int:
        return min(self.size, (self.pos // CHUNK_BYTES + 1) * CHUNK_BYTES)

    def _close_chunk_if_full(self) -> None:
        if self.pos != min(self.size, self.chunk_start + CHUNK_BYTES):
            return
        if self.chunk_has_data:
            self.chunk += ZERO_CHUNK[: self.pos - self.chunk_start - len(self.chunk)]
            length = len(self.chunk)
            zero = self.chunk == (ZERO_CHUNK if length == CHUNK_BYTES else ZERO_CHUNK[:length])
            self.segment.update(ZERO_CHUNK_DIGEST if zero else hashlib.sha256(self.chunk).digest())
        else:
            self.segment.update(ZERO_CHUNK_DIGEST)
        self.chunk.clear()
        self.chunk_has_data = False
        self.chunk_start = self.pos
        if self.pos % self.segment_bytes == 0 or self.pos == self.size:
            self.segments[self.pos] = self.segment.hexdigest()
            self.segment = hashlib.sha256()

    def data(self, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            if self.pos >= self.size:
                raise CopyError(f"volume read-back returned more than {self.size} bytes")
            take = min(len(view), self._boundary() - self.pos)
            # Leading hole inside this chunk: materialise its zeros before the data.
            self.chunk += ZERO_CHUNK[: self.pos - self.chunk_start - len(self.chunk)]
            self.chunk += view[:take]
            self.chunk_has_data = True
            self.pos += take
            view = view[take:]
            self._close_chunk_if_full()

    def hole(self, length: int) -> None:
        while length:
            if self.pos >= self.size:
                raise CopyError(f"volume read-back returned more than {self.size} bytes")
            take = min(length, self._boundary() - self.pos)
            self.pos += take
            length -= take
            self._close_chunk_if_full()


def verify_volume(conn: libvirt.virConnect, vol: libvirt.virStorageVol, progress: CopyProgress) -> None:
    """Read the volume back (sparse) and compare every segment's digest with the source's."""
    segment_bytes = progress.segment_bytes
    hasher = _ReadbackHasher(progress.size_bytes, segment_bytes)
    stream = conn.newStream(0)
    vol.download(stream, 0, progress.size_bytes, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)

    def on_data(_stream: libvirt.virStream, buf: bytes, _opaque: object) -> int:
        hasher.data(buf)
        return len(buf)

    def on_hole(_stream: libvirt.virStream, length: int, _opaque: object) -> int:
        hasher.hole(length)
        return 0

    try:
        stream.sparseRecvAll(on_data, on_hole, None)
        stream.finish()
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):  # the read error below is what matters
            stream.abort()
        raise CopyError(f"{progress.disk}: could not read the volume back: {exc}") from exc
    if hasher.pos != progress.size_bytes:
        raise CopyError(f"{progress.disk}: read back {hasher.pos} bytes, expected {progress.size_bytes}")
    mismatched = [
        end for end, digest in progress.segment_digests.items() if hasher.segments.get(end) != digest
    ]
    missing = sorted(set(hasher.segments) - set(progress.segment_digests))
    if mismatched or missing:
        raise CopyError(
            f"{progress.disk}: checksum mismatch in segments ending at "
            f"{sorted(mismatched)[:5]} (missing source digests: {missing[:5]})"
        )


def overall_digest(progress: CopyProgress) -> str:
    """One checksum for the whole disk: sha256 over the per-segment digests in disk order."""
    h = hashlib.sha256()
    for end in sorted(progress.segment_digests):
        h.update(bytes.fromhex(progress.segment_digests[end]))
    return h.hexdigest()
