#!/usr/bin/env bash
# Memory per key and the cost of the table, in one run: a brick (1 core, 1 replica)
# loaded with --keys keys of 150 B by the load generator, its resident memory then, and
# uniform gets and puts (2 clients x 100 in flight) on it; beside it Redis (one process,
# no persistence) loaded and driven by the same generator, and, with --against COMMIT,
# the same brick built from that commit, and with --cache-mb M the same brick keeping its
# values in the log with an M MiB cache (data that fits: is memory-only faster?).
# Repetitions interleaved; prints a markdown table for PERF.md.
#   ci/bench-memory.sh [--keys N] [--reps N] [--seconds S] [--against COMMIT] [--cache-mb M]
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/against.sh
keys=1000000; reps=3; seconds=3; against=""; cache_mb=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cache-mb) cache_mb="$2"; shift 2 ;;
    --keys) keys="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --against) against="$2"; shift 2 ;;
    *) echo "usage: ci/bench-memory.sh [--keys N] [--reps N] [--seconds S] [--against COMMIT] [--cache-mb M]" >&2; exit 2 ;;
  esac
done
if ! command -v redis-server >/dev/null; then
  echo "ci/bench-memory.sh: installing redis-server" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --locked -q
work="$(mktemp -d -t dds-bench-memory-XXXXXX)"
declare -A bins=([new]="$PWD/target/release/dds")
declare -A flags=([new]="" [old]="")
if [ -n "$cache_mb" ]; then
  bins[log]="$PWD/target/release/dds"
  flags[log]="--cache-mb $cache_mb"
fi
if [ -n "$against" ]; then
  echo "ci/bench-memory.sh: building $against for comparison" >&2
  bins[old]="$(build_against "$against" "$work")"
fi
redis_port=$((20000 + RANDOM % 10000))
cleanup() {
  for v in "${!bins[@]}"; do "${bins[$v]}" cluster down --dir "$work/$v" >/dev/null 2>&1 || true; done
  [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true
  against_cleanup "$work"
  rm -rf "$work"
}
trap cleanup EXIT
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# One load-and-measure of a target: gets (loading the keys first), the resident memory
# of `pid` after the load, then puts over the same keys. Appends to the results.
measure() {
  local name="$1" pid_of="$2"; shift 2
  "$@" --workload paper-read --keys "$keys" --clients 2 --seconds "$seconds" --warmup 1 --json "$work/$name-get.json" >/dev/null
  echo "$name rss_kib $(rss_kib "$($pid_of)")" >>"$work/results"
  "$@" --workload paper-write --keys "$keys" --clients 2 --seconds "$seconds" --warmup 1 --no-preload --json "$work/$name-put.json" >/dev/null
  python3 -c '
import json, sys
name, work = sys.argv[1], sys.argv[2]
for op in ("get", "put"):
    r = json.load(open(f"{work}/{name}-{op}.json"))
    if r["errors"]:
        sys.exit(f"{name} {op}: errors")
    print(name, op, r["ops_per_sec"], r["p50_us"], r["p99_us"])
' "$name" "$work" >>"$work/results"
}
: >"$work/results"
echo "machine: $(nproc) cores, $(uname -r); $(redis-server --version | cut -d' ' -f1-3); $keys keys of 150 B" >&2
for rep in $(seq "$reps"); do
  echo "rep $rep/$reps" >&2
  for v in "${!bins[@]}"; do
    dds="${bins[$v]}"
    # shellcheck disable=SC2086 # the flags are words
    "$dds" cluster up --dir "$work/$v" --bricks 1 --replicas 1 --cores 1 ${flags[$v]} >/dev/null
    brick_pid() { pgrep -f -- "--dir $work/$v/brick-0" | head -1; }
    measure "$v" brick_pid "$dds" bench --cluster "$work/$v"
    "$dds" cluster down --dir "$work/$v" >/dev/null
    rm -rf "${work:?}/$v"
  done
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --protected-mode no --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
  redis_pid=$!
  sleep 0.5
  redis_pid_of() { echo "$redis_pid"; }
  measure redis redis_pid_of "${bins[new]}" bench --target "redis://127.0.0.1:$redis_port"
  kill "$redis_pid"
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
done
python3 - "$work/results" "$keys" "$against" "$cache_mb" <<'PY'
import statistics, sys
path, keys, against, cache_mb = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = {}
for line in open(path):
    f = line.split()
    rows.setdefault((f[0], f[1]), []).append([float(x) for x in f[2:]])
def fmt(xs, d=0):
    m = statistics.median(xs)
    return f"{m:,.{d}f}" if len(xs) == 1 else f"{m:,.{d}f} ({min(xs):,.{d}f}–{max(xs):,.{d}f})"
names = [("new", "dds, this build"), ("log", f"dds, values in the log (--cache-mb {cache_mb})"), ("old", f"dds at {against}"), ("redis", "Redis (1 process, no persistence)")]
print(f"{keys:,} keys of 150 B; median (min–max) of {len(rows[('new', 'rss_kib')])} repetition(s)\n")
print("| system | resident MiB after the load | bytes per key | gets/s | get p50 µs | get p99 µs | puts/s | put p50 µs | put p99 µs |")
print("|---|---|---|---|---|---|---|---|---|")
for name, label in names:
    if (name, "rss_kib") not in rows:
        continue
    rss = [r[0] for r in rows[(name, "rss_kib")]]
    g, p = rows[(name, "get")], rows[(name, "put")]
    print(f"| {label} | {fmt([x / 1024 for x in rss], 1)} | {fmt([x * 1024 / keys for x in rss])} | {fmt([r[0] for r in g])} | {fmt([r[1] for r in g], 1)} | {fmt([r[2] for r in g], 1)} | {fmt([r[0] for r in p])} | {fmt([r[1] for r in p], 1)} | {fmt([r[2] for r in p], 1)} |")
PY
