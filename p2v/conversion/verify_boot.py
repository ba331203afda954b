"""The verification boot's patience: systemd's start timeouts stretched for that boot only.

Why: the verify stage boots the converted VM under emulation (TCG) on a shared hypervisor. systemd
starts each fstab filesystem's device job as soon as it leaves the initramfs, with the default
90 s timeout (DefaultTimeoutStartSec, which device units inherit), but udevd itself only starts
after the early units before it; on a host at load 20-45 on 2 cores that took more than 90 s
(measured: the job for /srv/data's disk at "1min 24s / 1min 31s" when udevd started), so the
device jobs timed out, local-fs.target failed and the VM entered emergency mode although every
disk was there. A physical server or a KVM guest does not take that long; the converted guest's
configuration is not the problem, the emulated proof boot is.

So, for the proof boot only, a marked block sets `DefaultTimeoutStartSec=` in the copied guest's
/etc/systemd/system.conf to the hypervisor's boot timeout (the verification waits that long
anyway), and the block is removed after the twin is stopped, leaving the file as it was. A disk
that is really missing still fails the verification: at the boot timeout instead of 90 s. The job
log says both steps. A guest without /etc/systemd/system.conf (no systemd, e.g. the stand-in) is
left alone.
"""

from __future__ import annotations

from . import adjust

SYSTEM_CONF = "/etc/systemd/system.conf"
BLOCK_START = "# P2V verification boot (removed after it):\n"
BLOCK_END = "# end of P2V verification boot\n"


def without_block(text: str) -> str:
    """The file as the guest had it: every P2V block removed (a resumed run may find one)."""
    while BLOCK_START in text:
        head, rest = text.split(BLOCK_START, 1)
        _, _, tail = rest.partition(BLOCK_END)
        text = head + tail
    return text


def with_block(text: str, timeout_s: int) -> str:
    """The guest's file plus a [Manager] section raising the start timeout (the last value wins)."""
    original = without_block(text)
    if original and not original.endswith("\n"):
        original += "\n"
    return original + BLOCK_START + f"[Manager]\nDefaultTimeoutStartSec={int(timeout_s)}s\n" + BLOCK_END


def relax_start_timeouts(volumes: list[str], facts: dict, timeout_s: int) -> str:
    """Write the block into the copied guest; what was done, for the job log."""
    root = adjust.find_root(volumes, facts)
    current = adjust.read_guest_file(root, SYSTEM_CONF)
    if current is None:
        return f"no {SYSTEM_CONF} in the guest: its start timeouts are left as they are"
    adjust.write_guest_file(root, SYSTEM_CONF, with_block(current, timeout_s))
    return (
        f"systemd start timeouts set to {int(timeout_s)} s for the verification boot only "
        f"({SYSTEM_CONF}, removed after it): emulation is slow, a device job must not time out at 90 s"
    )


def restore_start_timeouts(volumes: list[str], facts: dict) -> str | None:
    """Remove the block (the filesystems must be consistent first: e2fsck after a forced stop);
    what was done, or None when there was nothing to remove."""
    root = adjust.find_root(volumes, facts)
    current = adjust.read_guest_file(root, SYSTEM_CONF)
    if current is None or BLOCK_START not in current:
        return None
    adjust.write_guest_file(root, SYSTEM_CONF, without_block(current))
    return f"{SYSTEM_CONF} restored as the guest had it"
