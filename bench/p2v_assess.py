"""Benchmark: gathering a machine's facts over SSH, next to baselines measured in the same run.

    sudo .venv/bin/python bench/p2v_assess.py [--rounds 5]

Against the stand-in physical machine (tests/standin/machine.py: sshd in a network namespace, one
loop disk), each round measures:
* collect: `p2v.facts.collect_facts` as assessments run it: one SSH connection, independent probes
  on parallel channels (p2v.ssh.SSHSession.run_many);
* sequential: the same probes, one after the other on one connection (no run_many);
* openssh: the same commands through the OpenSSH client, one `ssh` process per command (what a
  shell script around `ssh host cmd` costs).
Also the cost of one bare command (`true`) on an open connection: the per-probe floor.
Needs root (namespaces, loop device). Prints best and median of each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

from p2v import facts, ssh
from tests.standin.machine import start_standin


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespace, loop device)")
    standin = start_standin()
    try:
        endpoint = ssh.Endpoint(
            standin.address, standin.port, standin.user, standin.private_key, standin.host_key_fingerprint
        )
        commands: list[str] = []

        def collect(parallel: bool) -> None:
            with ssh.connect(endpoint) as session:

                def run(command: str) -> facts.CommandOutput:
                    commands.append(command)
                    return session.run(command, 30)

                facts.collect_facts(run, (lambda cs: session.run_many(cs, 30)) if parallel else None)

        def openssh() -> None:
            base = [
                "ssh",
                "-i",
                str(standin.private_key_path),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                f"{standin.user}@{standin.address}",
            ]
            for command in probe_commands:
                subprocess.run([*base, command], capture_output=True, timeout=60, check=False)

        collect(False)  # warm up, and learn the command list
        probe_commands = list(dict.fromkeys(commands))
        results = {
            "collect (parallel channels)": [],
            "sequential, one connection": [],
            "openssh, one per command": [],
        }
        for _ in range(args.rounds):
            results["collect (parallel channels)"].append(timed(lambda: collect(True)))
            results["sequential, one connection"].append(timed(lambda: collect(False)))
            results["openssh, one per command"].append(timed(openssh))
        with ssh.connect(endpoint) as session:
            bare = [timed(lambda: session.run("true", 10)) for _ in range(20)]
    finally:
        standin.close()

    print(f"stand-in assessment probes: {len(probe_commands)} commands, {args.rounds} rounds")
    for name, values in results.items():
        print(f"  {name:32s} best {min(values):6.2f} s   median {statistics.median(values):6.2f} s")
    print(f"  one bare command on an open connection: median {statistics.median(bare) * 1000:.0f} ms")
    ours = statistics.median(results["collect (parallel channels)"])
    print(
        f"ratio sequential/collect: {statistics.median(results['sequential, one connection']) / ours:.2f}x, "
        f"openssh/collect: {statistics.median(results['openssh, one per command']) / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
