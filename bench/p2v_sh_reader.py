"""Benchmark: the copy's sh + dd fallback reader (sources without python3) next to the python3 reader.

    .venv/bin/python bench/p2v_sh_reader.py [--rounds 3] [--size-mib 512] [--used-mib 128] [--shell dash]

Both readers run locally on the same disk image (a sparse file with `used-mib` of random data in
1 MiB pieces spread over the disk), their stream read to the end by this process; no SSH, so the
figure is the source-side cost alone. Prints the median seconds of each, the used MiB per second,
and the ratio (how many times slower the fallback is). Both streams are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
MiB = 1024 * 1024


def make_image(path: Path, size_mib: int, used_mib: int) -> None:
    rng = random.Random(13)
    with path.open("wb") as image:
        image.truncate(size_mib * MiB)
        for chunk in rng.sample(range(size_mib), used_mib):
            image.seek(chunk * MiB)
            image.write(os.urandom(MiB))


def run(argv: list[str]) -> tuple[float, bytes]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=True, timeout=3600)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    from p2v.conversion import copy as copy_mod

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--used-mib", type=int, default=128)
    parser.add_argument("--shell", default="dash")
    args = parser.parse_args()
    if not 0 < args.used_mib <= args.size_mib:
        parser.error(f"--used-mib must be between 1 and --size-mib ({args.size_mib}), got {args.used_mib}")
    segment = str(copy_mod.DEFAULT_SEGMENT_BYTES)
    with tempfile.TemporaryDirectory(prefix="p2v-bench-sh-") as tmp:
        image = Path(tmp) / "disk.img"
        make_image(image, args.size_mib, args.used_mib)
        size = str(image.stat().st_size)
        python_argv = ["python3", "-c", copy_mod.SOURCE_READER, str(image), "0", segment, ""]
        sh_argv = [args.shell, "-c", copy_mod.SH_READER, "p2v-reader", str(image), "0", segment, size, ""]
        python_s, sh_s = [], []
        for _ in range(args.rounds):
            seconds, python_stream = run(python_argv)
            python_s.append(seconds)
            seconds, sh_stream = run(sh_argv)
            sh_s.append(seconds)
            if sh_stream != python_stream:
                raise SystemExit("the sh reader's stream differs from the python3 reader's")
    py, sh = statistics.median(python_s), statistics.median(sh_s)
    print(f"disk {args.size_mib} MiB, {args.used_mib} MiB used, {args.rounds} rounds, shell {args.shell}")
    print(f"python3 reader: {py:.2f} s ({args.used_mib / py:.0f} MiB/s of used data)")
    print(f"sh + dd reader: {sh:.2f} s ({args.used_mib / sh:.0f} MiB/s of used data)")
    print(f"ratio sh / python3: {sh / py:.1f}x slower")


if __name__ == "__main__":
    main()
