#!/usr/bin/env bash
# Issue 16's flake check: `make test` N times in a row on a fresh clone of HEAD while a CPU hog keeps
# one core busy, then once without. Usage: scripts/suite-under-cpu-hog.sh [N=3] [IDLE=1]
# (IDLE=0 skips the run without the hog, e.g. when CI's run of the same commit is that run).
# Each run's output is kept under var/hog-runs/; the summary line of each run is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
idle="${2:-1}"
out="$PWD/var/hog-runs/$(date -u +%Y%m%dT%H%M%SZ)"
clone="$(mktemp -d /tmp/dc-hog-clone.XXXXXX)"
mkdir -p "$out"
git clone -q "$PWD" "$clone/repo"
hog=""
cleanup() {
  [ -n "$hog" ] && kill "$hog" 2>/dev/null || true
  rm -rf "$clone"
}
trap cleanup EXIT
run() {  # $1: label
  local started=$SECONDS status=0
  (cd "$clone/repo" && CI=true make test) >"$out/$1.log" 2>&1 || status=$?
  echo "$1: exit $status after $((SECONDS - started)) s: $(tail -n 1 "$out/$1.log")" | tee -a "$out/summary.txt"
  return 0
}
python3 -c 'while True: pass' & hog=$!   # one core busy for the whole series (killed by PID)
for i in $(seq 1 "$runs"); do run "hog-$i"; done
kill "$hog"; wait "$hog" 2>/dev/null || true; hog=""
[ "$idle" = 0 ] || run "idle"
cat "$out/summary.txt"
! grep -qv ": exit 0 " "$out/summary.txt"
