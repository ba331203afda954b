"""The copy's retry policy: backoff grows to its cap, bad settings are refused by name, and a source
that stays unreachable makes the copy give up once the window passes, naming the window.

The unreachable source is a real closed TCP port on loopback (connection refused), not a mock.
"""

from __future__ import annotations

import socket

import paramiko
import pytest
from django.test import override_settings

from p2v.conversion import copy as copy_mod
from p2v.conversion.services import copy_retry_policy


def test_backoff_doubles_up_to_its_cap():
    policy = copy_mod.RetryPolicy(initial_delay_s=2, max_delay_s=60, window_s=900)
    assert [policy.delay_s(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"initial_delay_s": 0}, "initial_delay_s"),
        ({"window_s": -1}, "window_s"),
        ({"initial_delay_s": 10, "max_delay_s": 5}, "max_delay_s"),
    ],
)
def test_bad_policy_is_refused_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        copy_mod.RetryPolicy(**kwargs)


def test_policy_comes_from_settings_and_bad_values_name_the_setting():
    with override_settings(
        P2V_COPY_RETRY_INITIAL_S=1, P2V_COPY_RETRY_MAX_S="30", P2V_COPY_RETRY_WINDOW_S=600
    ):
        assert copy_retry_policy() == copy_mod.RetryPolicy(1, 30, 600)
    with (
        override_settings(P2V_COPY_RETRY_WINDOW_S="ten minutes"),
        pytest.raises(ValueError, match=r"P2V_COPY_RETRY_WINDOW_S.*'ten minutes'"),
    ):
        copy_retry_policy()
    # Defaults ride out a reboot: minutes, not seconds.
    assert copy_mod.RetryPolicy().window_s >= 300


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when we leave: connections are refused


def test_unreachable_source_gives_up_after_the_window_and_says_so():
    port = closed_loopback_port()
    attempts: list[int] = []

    def open_ssh() -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        try:
            client.connect("127.0.0.1", port=port, timeout=5)  # refused: nothing listens there
        finally:
            attempts.append(1)
        return client

    policy = copy_mod.RetryPolicy(initial_delay_s=0.05, max_delay_s=0.2, window_s=1.0)
    with pytest.raises(copy_mod.CopyError, match=r"retry window 1 s.*offset 0") as caught:
        copy_mod.copy_disk(open_ssh, "/dev/sdz", None, None, 1 << 20, disk_name="sdz", retry=policy)
    assert "sdz" in str(caught.value)
    assert f"after {len(attempts)} attempts" in str(caught.value)
