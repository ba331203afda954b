"""Shared helpers of the P2V unit tests: a real key pair and a machine row."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

from p2v.models import Machine


@functools.cache
def ed25519_key_pair() -> tuple[str, str]:
    """(private OpenSSH PEM, public line) made by ssh-keygen, once per test session."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2v-test", "-f", str(path)],
            check=True,
            timeout=30,
        )
        return path.read_text(), path.with_suffix(".pub").read_text().strip()


def make_machine(name: str = "db-1", **fields) -> Machine:
    machine = Machine(name=name, address="10.9.0.2", **fields)
    machine.set_private_key(ed25519_key_pair()[0])
    machine.save()
    return machine
