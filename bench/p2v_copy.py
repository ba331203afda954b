"""Benchmark: P2V disk copy over SSH into a libvirt volume, next to `ssh host cat disk > /dev/null`,
and the total time from "convert" to a verified boot of the stand-in.

    sudo .venv/bin/python bench/p2v_copy.py [--rounds 3] [--size-mib 1024] [--used-mib 100 700]

For each disk layout (a 1 GiB stand-in disk with ~100 MiB used, and a denser one), each round
measures, against the stand-in physical machine (sshd in a network namespace, disk on a loop device):
* p2v copy: p2v.conversion.copy.copy_disk (source-side zero detection, sparse vol.upload into a
  libvirt `dir` pool), the data carried by the OpenSSH client (what conversions use; host key
  verified by paramiko first) or by paramiko; then the read-back checksum (verify_volume);
* baseline: the OpenSSH client streaming the whole device to /dev/null (`ssh host cat /dev/loopN`).
Throughput is disk bytes per second (both read the whole disk); the ratio is copy / baseline.

Then one full conversion of a BIOS stand-in, stage by stage in this process (the same
services.run_stage the Celery worker runs; a throwaway SQLite database, no Redis): assessment over
SSH, plan, copy, build, adjust, boot (TCG) and compare. Needs root and a running libvirtd
(scripts/start-libvirtd.sh).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
MiB = 1024 * 1024


def ssh_cat_seconds(standin) -> float:
    argv = [
        "ssh",
        "-i",
        str(standin.private_key_path),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-p",
        str(standin.port),
        f"{standin.user}@{standin.address}",
        f"cat {standin.loop_device}",
    ]
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, timeout=600)
    return time.perf_counter() - start


def bench_copy(conn, pool, prefix: str, size_mib: int, used_mib: int, rounds: int, transport: str) -> dict:
    from p2v import ssh
    from p2v.conversion import copy as copy_mod
    from tests.standin.machine import start_standin

    standin = start_standin(firmware="bios", disk_size_bytes=size_mib * MiB, used_bytes=used_mib * MiB)
    endpoint = ssh.Endpoint(
        standin.address, standin.port, standin.user, standin.private_key, standin.host_key_fingerprint
    )
    rows = []
    login = None
    if transport == "openssh":
        login = copy_mod.OpenSSHLogin(standin.address, standin.port, standin.user, standin.private_key)
    try:
        used = os.stat(standin.image_path).st_blocks * 512
        for index in range(rounds):
            baseline = ssh_cat_seconds(standin)
            vol = pool.createXML(
                f"<volume><name>{prefix}{index}.raw</name><capacity unit='bytes'>"
                f"{standin.disk_size_bytes}</capacity><allocation>0</allocation>"
                "<target><format type='raw'/></target></volume>",
                0,
            )
            try:
                start = time.perf_counter()
                progress = copy_mod.copy_disk(
                    lambda: ssh.connect(endpoint).client,
                    standin.loop_device,
                    conn,
                    vol,
                    standin.disk_size_bytes,
                    openssh=login,
                )
                copy_s = time.perf_counter() - start
                start = time.perf_counter()
                copy_mod.verify_volume(conn, vol, progress)
                verify_s = time.perf_counter() - start
                allocation = vol.info()[2]
            finally:
                vol.delete(0)
            rows.append(
                {
                    "copy_s": copy_s,
                    "verify_s": verify_s,
                    "baseline_s": baseline,
                    "wire": progress.wire_bytes,
                    "allocation": allocation,
                }
            )
            print(
                f"  round {index + 1}: copy {copy_s:.2f} s (+ read-back verify {verify_s:.2f} s), "
                f"ssh cat {baseline:.2f} s, over SSH {progress.wire_bytes / MiB:.1f} MiB, "
                f"volume allocation {allocation / MiB:.1f} MiB",
                flush=True,
            )
    finally:
        standin.close()
    size = size_mib * MiB
    copy_s = statistics.median(r["copy_s"] for r in rows)
    baseline_s = statistics.median(r["baseline_s"] for r in rows)
    return {
        "size": size,
        "used": used,
        "copy_mib_s": size / copy_s / MiB,
        "baseline_mib_s": size / baseline_s / MiB,
        "copy_with_verify_mib_s": size / statistics.median(r["copy_s"] + r["verify_s"] for r in rows) / MiB,
        "ratio": baseline_s / copy_s,
        "wire": rows[-1]["wire"],
        "allocation": rows[-1]["allocation"],
    }


def bench_conversion(pool_name: str, prefix: str) -> dict:
    """Assess + convert a BIOS stand-in in-process; returns seconds per stage and the total."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}db-"))
    os.environ.pop("REDIS_URL", None)  # embedded mode: in-memory channel layer, no broker needed
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["DATACENTER_VAR_DIR"] = str(workdir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from p2v import services as p2v_services
    from p2v.conversion import services
    from p2v.conversion.models import ConversionJob, Hypervisor
    from p2v.models import Assessment, ConversionEvent, Machine
    from tests.standin.machine import start_standin

    standin = start_standin(firmware="bios")
    try:
        Hypervisor.objects.create(
            name="bench",
            storage_pool=pool_name,
            memory_cap_bytes=256 * MiB,
            name_prefix=prefix[:16],
            console_dir=str(workdir / "console"),
        )
        endpoint = standin.endpoint()
        machine = Machine(
            name="bench-standin",
            address=endpoint["address"],
            ssh_port=endpoint["port"],
            ssh_user=endpoint["user"],
            host_key_fingerprint=endpoint["host_key_fingerprint"],
        )
        machine.set_private_key(endpoint["private_key"])
        machine.save()
        timings = {}
        start = time.perf_counter()
        assessment = Assessment.objects.create(machine=machine)
        assessment = p2v_services.run_assessment(assessment.pk)
        timings["assess"] = time.perf_counter() - start
        event = ConversionEvent.objects.create(
            machine=machine, kind="manual", status="started", raised_by="bench", assessment=assessment
        )
        convert_start = time.perf_counter()
        job = services.start_conversion(event)
        while True:
            stage = ConversionJob.objects.get(pk=job.pk).stage
            stage_start = time.perf_counter()
            more = services.run_stage(job.pk)
            timings[stage] = time.perf_counter() - stage_start
            if not more:
                break
        timings["convert_to_verified_boot"] = time.perf_counter() - convert_start
        job.refresh_from_db()
        if job.state != "succeeded":
            raise SystemExit(f"conversion failed: {job.error}")
        timings["guest_boot_to_report"] = job.verification["seconds_to_proof"]
        services.remove_converted_vm(job)
        return timings
    finally:
        standin.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--used-mib", type=int, nargs="+", default=[100, 700])
    parser.add_argument(
        "--transport",
        nargs="+",
        default=["openssh", "paramiko"],
        choices=["openssh", "paramiko"],
        help="what carries the data (the conversion uses openssh when the ssh client exists)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespace, loop device, libvirtd)")
    subprocess.run([str(REPO_ROOT / "scripts" / "start-libvirtd.sh")], check=True, timeout=120)
    import libvirt

    prefix = f"p2vb{secrets.token_hex(3)}-"
    pool_dir = REPO_ROOT / "var" / "tmp" / f"{prefix}pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    conn = libvirt.open("qemu:///system")
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{prefix}pool</name><target><path>{pool_dir}</path></target></pool>", 0
    )
    pool.create(0)
    try:
        for used_mib, transport in [(u, t) for u in args.used_mib for t in args.transport]:
            print(
                f"disk {args.size_mib} MiB, about {used_mib} MiB used, data via {transport}, "
                f"{args.rounds} rounds:",
                flush=True,
            )
            r = bench_copy(conn, pool, prefix, args.size_mib, used_mib, args.rounds, transport)
            print(
                f"  median: p2v copy {r['copy_mib_s']:.0f} MiB/s of disk ({r['copy_with_verify_mib_s']:.0f} "
                f"with read-back verify) vs ssh cat {r['baseline_mib_s']:.0f} MiB/s -> "
                f"ratio {r['ratio']:.2f} "
                f"(goal >= 0.8); over SSH {r['wire'] / MiB:.1f} MiB for {r['used'] / MiB:.1f} MiB allocated "
                f"on the source ({r['wire'] / r['used']:.3f}x); "
                f"volume allocation {r['allocation'] / MiB:.1f} MiB",
                flush=True,
            )
        print("full conversion of a 256 MiB BIOS stand-in (in-process stages, TCG boot):", flush=True)
        timings = bench_conversion(pool.name(), prefix)
        print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
    finally:
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(prefix):
                vol.delete(0)
        for domain in conn.listAllDomains(0):
            if domain.name().startswith(prefix):
                if domain.isActive():
                    domain.destroy()
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        pool.destroy()
        pool.undefine()
        shutil.rmtree(pool_dir, ignore_errors=True)
        conn.close()


if __name__ == "__main__":
    main()
