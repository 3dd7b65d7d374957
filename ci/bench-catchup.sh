#!/usr/bin/env bash
# Recovery in proportion to what was missed (issue 17's bench): 3 bricks x 2 replicas
# holding --keys keys of 150 B. Each repetition kills brick 0, writes --writes keys
# (new values) while it is down, restarts it and prints what the copy driver sent it
# (a catch-up from its own data); then kills it again, wipes its directory and restarts
# it (a full copy of the same brick). Beside them, in the same run, fio's sequential
# write rate on the same file system, and the CPU each side of every copy used. Prints
# markdown tables for PERF.md.
#   ci/bench-catchup.sh [--keys N] [--writes N] [--reps N]
set -euo pipefail
cd "$(dirname "$0")/.."
keys=1000000; writes=10000; reps=3
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) keys="$2"; shift 2 ;;
    --writes) writes="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    *) echo "usage: ci/bench-catchup.sh [--keys N] [--writes N] [--reps N]" >&2; exit 2 ;;
  esac
done
if ! command -v fio >/dev/null; then
  echo "ci/bench-catchup.sh: installing fio" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
cargo build --release --locked -q
dds="$PWD/target/release/dds"
work="$(mktemp -d -t dds-bench-catchup-XXXXXX)"
cleanup() {
  "$dds" cluster down --dir "$work/c" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"$dds" cluster up --dir "$work/c" --bricks 3 --replicas 2 --cores 1 >/dev/null
echo "ci/bench-catchup.sh: writing $keys keys of 150 B" >&2
"$dds" bench --cluster "$work/c" --workload paper-read --keys "$keys" --seconds 0.2 --warmup 0 --clients 2 >/dev/null
fio_mbs=$(fio --name=seq --filename="$work/fio.dat" --rw=write --bs=1M --size=512M --ioengine=psync --fdatasync=0 \
  --end_fsync=1 --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6)')
rm -f "$work/fio.dat"
# The copy driver's account, from `cluster restart`: partitions caught up, keys the
# joining brick wrote (stored or changed), bytes sent to it, digest bytes, time.
recovery() {
  python3 -c '
import re, sys
text = sys.stdin.read()
line = next(l for l in text.splitlines() if "recovery:" in l)
def size(s):
    n, unit = s.split()
    return float(n) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[unit]
m = re.search(r"copied \((\d+) caught up.*?\), (\d+) keys, ([\d.]+ \w+) in (\d+) ms .*?, ([\d.]+ \w+) of digests", line)
caught, k, sent, ms, digests = m.groups()
print(caught, k, int(size(sent)), ms, int(size(digests)))
'
}
# CPU ms (user + system) used so far by the cluster's processes whose directory is
# `$work/c/$1*` (brick-0, brick-, meta-), from /proc; a brick restarted since counts from
# its start.
cpu_ms() {
  local total=0 pid ticks
  for pid in $(pgrep -f -- "--dir $work/c/$1" || true); do
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + ticks))
  done
  echo $((total * 1000 / $(getconf CLK_TCK)))
}
# Runs `cluster restart` of brick 0 and prints the recovery's account and the CPU ms
# its brick, the other bricks and the authority used meanwhile.
restart_measured() {
  local others0 meta0 line joining
  others0=$(($(cpu_ms brick-) - $(cpu_ms brick-0)))
  meta0=$(cpu_ms meta-)
  line=$("$dds" cluster restart --dir "$work/c" --brick 0 | tee -a "$work/log" | recovery)
  joining=$(cpu_ms brick-0)
  echo "$line $joining $(($(cpu_ms brick-) - joining - others0)) $(($(cpu_ms meta-) - meta0))"
}
for rep in $(seq "$reps"); do
  echo "rep $rep/$reps" >&2
  "$dds" cluster kill --dir "$work/c" --brick 0 >/dev/null
  sleep 1
  "$dds" bench --cluster "$work/c" --workload paper-write --keys "$keys" --ops-max "$writes" --seconds 30 --warmup 0 \
    --clients 2 --no-preload --seed $((rep + 100)) >/dev/null
  restart_measured | sed "s/^/catchup /" >>"$work/results"
  "$dds" cluster kill --dir "$work/c" --brick 0 >/dev/null
  sleep 1
  rm -rf "${work:?}/c/brick-0/"*
  restart_measured | sed "s/^/full /" >>"$work/results"
done
python3 - "$work/results" "$keys" "$writes" "$fio_mbs" <<'PY'
import statistics, sys
path, keys, writes, fio = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows = {"catchup": [], "full": []}
for line in open(path):
    kind, caught, k, sent, ms, digests, cpu_joining, cpu_sources, cpu_meta = line.split()
    rows[kind].append((int(caught), int(k), int(sent), int(ms), int(digests), int(cpu_joining), int(cpu_sources), int(cpu_meta)))
def med(xs): return statistics.median(xs)
def fmt(xs, d=0):
    m = med(xs)
    return f"{m:,.{d}f}" if len(xs) == 1 else f"{m:,.{d}f} ({min(xs):,.{d}f}-{max(xs):,.{d}f})"
# What was written while the brick was down, as the copy carries it: an entry header
# (6 B), the key (the bench's keys are 16 B) and the value.
written = writes * (6 + 16 + 150)
print(f"{keys:,} keys of 150 B on 3 bricks x 2 replicas; {writes:,} writes while brick 0 was down ({written/1e6:.2f} MB as copied entries); fio sequential write {fio:,.0f} MB/s")
print()
print("| copy | partitions caught up | keys written to it | MB sent to it | sent / written | digests MB | time ms | MB/s | MB/s / fio |")
print("|---|---|---|---|---|---|---|---|---|")
for kind, name in (("catchup", "catch-up after a kill"), ("full", "full copy (wiped directory)")):
    r = rows[kind]
    caught = [x[0] for x in r]; k = [x[1] for x in r]; sent = [x[2] / 1e6 for x in r]; ms = [x[3] for x in r]; dg = [x[4] / 1e6 for x in r]
    rate = [s / (t / 1000) if t else 0 for s, t in zip(sent, ms)]
    ratio = f"{med(sent) * 1e6 / written:.2f}" if kind == "catchup" else ""
    print(f"| {name} | {fmt(caught)} | {fmt(k)} | {fmt(sent, 2)} | {ratio} | {fmt(dg, 2)} | {fmt(ms)} | {fmt(rate, 1)} | {med(rate) / fio:.3f} |")
# CPU per MB sent is steadier than time on a small shared machine: what each side of the
# copy costs, whatever else ran.
print()
print("| copy | CPU ms of the joining brick (from its start) | of the other bricks | of the authority | joining brick CPU ms per MB sent | all CPU ms per MB sent |")
print("|---|---|---|---|---|---|")
for kind, name in (("catchup", "catch-up after a kill"), ("full", "full copy (wiped directory)")):
    r = rows[kind]
    joining = [x[5] for x in r]; sources = [x[6] for x in r]; meta = [x[7] for x in r]
    per_mb = [x[5] / (x[2] / 1e6) if x[2] else 0 for x in r]
    all_per_mb = [(x[5] + x[6] + x[7]) / (x[2] / 1e6) if x[2] else 0 for x in r]
    print(f"| {name} | {fmt(joining)} | {fmt(sources)} | {fmt(meta)} | {fmt(per_mb, 2)} | {fmt(all_per_mb, 2)} |")
PY
