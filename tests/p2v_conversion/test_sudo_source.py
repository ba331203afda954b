"""Sources where root cannot log in: a real sshd (the stand-in) with a non-root login user whose
/etc/passwd, shadow and sudoers exist only inside the stand-in's mount namespace; real sudo.

The probes and the disk reader run through sudo (NOPASSWD, or the stored sudo password fed on
stdin); the assessment records which way it ran, and blocks with the reason when neither works.
"""

from __future__ import annotations

import dataclasses

import pytest

from p2v import ssh
from p2v.conversion import copy as copy_mod
from p2v.models import Assessment, Machine
from p2v.services import run_assessment
from tests.p2v_conversion.conftest import MiB, standin_endpoint
from tests.p2v_conversion.test_copy import new_volume, same_bytes
from tests.standin.machine import need_standin_tools, start_standin

pytestmark = [pytest.mark.standin, pytest.mark.slow]
USER = "p2vadmin"
SUDO_PASSWORD = "correct horse 'battery' $staple"  # quotes and $ must survive, never on a command line


@pytest.fixture(scope="module")
def sudo_standin():
    need_standin_tools()
    machine = start_standin(firmware="bios", disk_size_bytes=128 * MiB, used_bytes=8 * MiB)
    try:
        yield machine
    finally:
        machine.close()


def endpoint(standin, sudo_password: str | None = None) -> ssh.Endpoint:
    return dataclasses.replace(standin_endpoint(standin), sudo_password=sudo_password)


def test_nopasswd_sudo_runs_probes_and_the_disk_reader_as_root(
    sudo_standin, libvirt_conn, p2v_pool, p2v_prefix
):
    sudo_standin.add_login_user(USER, sudo="nopasswd")
    with ssh.connect(endpoint(sudo_standin), privileged=False) as plain:
        assert plain.run("id -u").stdout.strip() == "4242"  # really logged in as the non-root user
        assert plain.run(f"head -c 1 {sudo_standin.loop_device}").exit_status != 0  # disk: root only
    with ssh.connect(endpoint(sudo_standin)) as session:
        assert session.privilege.via == ssh.PRIVILEGE_SUDO
        assert session.run("id -u").stdout.strip() == "0"
        assert session.run("echo \"$LC_ALL\" 'it''s'").stdout.strip() == "C its"  # quoting survives sudo

    for transport in ("paramiko", "openssh"):
        vol = new_volume(p2v_pool, f"{p2v_prefix}sudo-{transport}.raw", sudo_standin.disk_size_bytes)
        sessions: list[ssh.SSHSession] = []

        def open_ssh(sessions: list[ssh.SSHSession] = sessions) -> object:
            sessions.append(ssh.connect(endpoint(sudo_standin)))
            return sessions[-1].client

        try:
            open_ssh()  # learn the privilege the reader needs, as copy_stage does
            progress = copy_mod.copy_disk(
                open_ssh,
                sudo_standin.loop_device,
                libvirt_conn,
                vol,
                sudo_standin.disk_size_bytes,
                privilege=sessions[0].privilege,
                openssh=copy_mod.OpenSSHLogin(
                    sudo_standin.address, sudo_standin.port, USER, sudo_standin.private_key
                )
                if transport == "openssh"
                else None,
            )
            copy_mod.verify_volume(libvirt_conn, vol, progress)
            assert same_bytes(sudo_standin.image_path, vol.path()), transport
        finally:
            for session in sessions:
                session.close()
            vol.delete(0)


def test_sudo_password_is_used_from_the_credential_and_a_missing_or_wrong_one_says_why(sudo_standin):
    sudo_standin.add_login_user(USER, sudo="password", password=SUDO_PASSWORD)
    with ssh.connect(endpoint(sudo_standin, SUDO_PASSWORD)) as session:
        assert session.privilege.via == ssh.PRIVILEGE_SUDO_PASSWORD
        assert session.run("id -u").stdout.strip() == "0"
        assert SUDO_PASSWORD not in repr(session.privilege)
    with pytest.raises(ssh.PrivilegeUnavailable, match="no sudo password stored"):
        ssh.connect(endpoint(sudo_standin))
    with pytest.raises(ssh.PrivilegeUnavailable, match=f"'{USER}' is not root") as wrong:
        ssh.connect(endpoint(sudo_standin, "not the password"))
    assert "not the password" not in str(wrong.value)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("sudo", "via"), [("nopasswd", "sudo"), ("password", "sudo-password"), ("none", None)]
)
def test_assessment_says_how_it_got_root_or_blocks_with_the_reason(sudo_standin, sudo, via):
    sudo_standin.add_login_user(USER, sudo=sudo, password=SUDO_PASSWORD)
    machine = Machine(
        name=f"sudo-{sudo}",
        address=sudo_standin.address,
        ssh_port=sudo_standin.port,
        ssh_user=USER,
        host_key_fingerprint=sudo_standin.host_key_fingerprint,
    )
    machine.set_private_key(sudo_standin.private_key)
    machine.set_sudo_password(SUDO_PASSWORD)
    machine.save()
    assessment = run_assessment(Assessment.objects.create(machine=machine).pk)
    assert assessment.status == "succeeded", assessment.error
    assert assessment.facts["access"]["user"] == USER
    assert assessment.facts["access"]["via"] == via
    blockers = {b["rule"]: b["message"] for b in assessment.blockers}
    if via is None:
        assert "root_access" in blockers
        assert f"'{USER}' is not root" in blockers["root_access"]
        assert "NOPASSWD" in blockers["root_access"]
    else:
        assert "root_access" not in blockers
        # Root-only facts were gathered: the disk's partitions come from reading the disk itself.
        assert assessment.facts["disks"], assessment.facts
