#!/usr/bin/env bash
# Write throughput and latency of a durable brick (group commit, --durability sync) at 1,
# 16 and 256 writes in flight, beside this disk's raw fdatasync latency from fio (the
# floor: one 4 KiB write + fdatasync per operation), measured in the same run, on the
# same filesystem. Repetitions interleaved; prints a markdown table for PERF.md.
#   ci/bench-log.sh [--reps N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=3; seconds=5
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    *) echo "usage: ci/bench-log.sh [--reps N] [--seconds S]" >&2; exit 2 ;;
  esac
done
if ! command -v fio >/dev/null; then
  echo "ci/bench-log.sh: installing fio"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
cargo build --release --locked
dds="$PWD/target/release/dds"
work="$(mktemp -d -t dds-bench-log-XXXXXX)"
cleanup() {
  for d in sync memory; do "$dds" cluster down --dir "$work/$d" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
"$dds" cluster up --dir "$work/sync" --bricks 1 --cores 1 --durability sync >/dev/null
"$dds" cluster up --dir "$work/memory" --bricks 1 --cores 1 --durability memory >/dev/null
echo "machine: $(nproc) cores, $(uname -r); filesystem: $(df -h "$work" | awk 'NR==2 {print $1, $2}'); $(fio --version)"
for rep in $(seq "$reps"); do
  echo "rep $rep/$reps" >&2
  fio --name=fdatasync --directory="$work" --filename=fio.dat --rw=write --bs=4k --size=64m \
    --fdatasync=1 --ioengine=sync --runtime="$seconds" --time_based --output-format=json \
    >"$work/fio-$rep.json" 2>/dev/null
  rm -f "$work/fio.dat"
  for shape in 1x1 4x4 16x16; do
    c=${shape%x*}; q=${shape#*x}
    for d in sync memory; do
      "$dds" bench --cluster "$work/$d" --workload write --clients "$c" --depth "$q" --keys 100000 \
        --seconds "$seconds" --warmup 1 --json "$work/$d-$shape-$rep.json" >/dev/null
    done
  done
done
python3 - "$work" "$reps" "$seconds" <<'PY'
import json, statistics, sys
work, reps, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def fmt(xs, d=1):
    m = statistics.median(xs)
    return f"{m:,.{d}f}" if len(xs) == 1 else f"{m:,.{d}f} ({min(xs):,.{d}f}–{max(xs):,.{d}f})"
fio = [json.load(open(f"{work}/fio-{r}.json"))["jobs"][0] for r in range(1, reps + 1)]
sync_p50 = [j["sync"]["lat_ns"]["percentile"]["50.000000"] / 1000 for j in fio]
sync_p99 = [j["sync"]["lat_ns"]["percentile"]["99.000000"] / 1000 for j in fio]
iops = [j["write"]["iops"] for j in fio]
print(f"\nmedian (min–max) of {reps} repetition(s) of {seconds} s\n")
print("| writes in flight | durability | ops/s | p50 µs | p99 µs | p50 ÷ fio fdatasync p50 | ops/s ÷ fio ops/s |")
print("|---|---|---|---|---|---|---|")
print(f"| fio: 4 KiB write + fdatasync, 1 in flight | floor | {fmt(iops, 0)} | {fmt(sync_p50)} | {fmt(sync_p99)} | 1.00 | 1.00 |")
for shape in ["1x1", "4x4", "16x16"]:
    c, q = map(int, shape.split("x"))
    for d in ["sync", "memory"]:
        rs = [json.load(open(f"{work}/{d}-{shape}-{r}.json")) for r in range(1, reps + 1)]
        ops = [r["ops_per_sec"] for r in rs]; p50 = [r["p50_us"] for r in rs]; p99 = [r["p99_us"] for r in rs]
        if any(r["errors"] for r in rs):
            sys.exit(f"{d} {shape}: errors")
        r50 = statistics.median([a / b for a, b in zip(p50, sync_p50)])
        rops = statistics.median([a / b for a, b in zip(ops, iops)])
        print(f"| {c * q} ({c} clients x {q}) | {d} | {fmt(ops, 0)} | {fmt(p50)} | {fmt(p99)} | {r50:.2f} | {rops:.2f} |")
PY
