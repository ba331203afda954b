"""SIGTERM must always end the daemon's loop.

The handler runs on the main thread between two bytecodes, possibly while that thread is inside
the loop's wait. With a threading.Event, `set()` from the handler needed the lock `wait()` was
holding, and the daemon hung for good (a CI run caught it: "mux-1 daemon did not stop within
20 s"). The test hammers the loop's wait with signals from an interval timer in a child process,
so a deadlock shows up as a timeout instead of hanging the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    from lbagent.daemon import DaemonOptions, MuxDaemon

    daemon = MuxDaemon(DaemonOptions(config=Path("unused.json"), poll_s=0.0))
    stops = 0

    def on_alarm(*_):
        daemon.stop()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)
    for _ in range(int(sys.argv[1])):
        while not daemon._wait_for_stop(0.0):
            pass
        stops += 1
        daemon._stopping = False  # ask again: the next signal must end the wait again
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    print(stops)
    """
)


def test_stop_from_a_signal_handler_always_ends_the_wait() -> None:
    rounds = 20000
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(rounds)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon's wait deadlocked on a stop() from a signal handler") from None
    assert int(out) == rounds
