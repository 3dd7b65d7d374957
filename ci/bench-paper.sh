#!/usr/bin/env bash
# The paper's in-core benchmark (Gribble et al., OSDI 2000, section 5): 150-byte values,
# closed loop, 100 operations in flight per client, reads and writes measured apart, on
# dds clusters of 1, 2 and 4 bricks (2 replicas where there are 2 bricks or more; one
# brick can only hold one), beside Redis (one process, no replication) driven by the same
# load generator in the same run. Repetitions interleaved; prints a markdown table for
# PERF.md with the paper's 128-brick figures alongside.
#   ci/bench-paper.sh [--reps N] [--seconds S] [--clients C]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=3; seconds=5; clients=2
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --clients) clients="$2"; shift 2 ;;
    *) echo "usage: ci/bench-paper.sh [--reps N] [--seconds S] [--clients C]" >&2; exit 2 ;;
  esac
done
if ! command -v redis-server >/dev/null; then
  echo "ci/bench-paper.sh: installing redis-server"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --locked
dds="$PWD/target/release/dds"
work="$(mktemp -d -t dds-bench-paper-XXXXXX)"
REDIS_PORT=$((20000 + RANDOM % 10000))
cleanup() {
  for b in 1 2 4; do "$dds" cluster down --dir "$work/b$b" >/dev/null 2>&1 || true; done
  [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --protected-mode no --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
redis_pid=$!
for b in 1 2 4; do
  r=$(( b >= 2 ? 2 : 1 ))
  "$dds" cluster up --dir "$work/b$b" --bricks "$b" --replicas "$r" --cores 1 >/dev/null
done
echo "machine: $(nproc) cores, $(uname -r); $(redis-server --version | cut -d' ' -f1-3); $clients client threads x 100 in flight"
for rep in $(seq "$reps"); do
  echo "rep $rep/$reps" >&2
  for w in paper-read paper-write; do
    for b in 1 2 4; do
      "$dds" bench --cluster "$work/b$b" --workload "$w" --clients "$clients" \
        --seconds "$seconds" --warmup 1 --json "$work/dds-b$b-$w-$rep.json" >/dev/null
    done
    "$dds" bench --target "redis://127.0.0.1:$REDIS_PORT" --workload "$w" --clients "$clients" \
      --seconds "$seconds" --warmup 1 --json "$work/redis-$w-$rep.json" >/dev/null
  done
done
python3 - "$work" "$reps" "$seconds" <<'PY'
import json, statistics, sys
work, reps, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
paper = {"paper-read": 61432, "paper-write": 13582}  # 128 bricks, 2 replicas
def fmt(xs, d=0):
    m = statistics.median(xs)
    return f"{m:,.{d}f}" if len(xs) == 1 else f"{m:,.{d}f} ({min(xs):,.{d}f}–{max(xs):,.{d}f})"
def load(name):
    rs = [json.load(open(f"{work}/{name}-{r}.json")) for r in range(1, reps + 1)]
    if any(r["errors"] for r in rs):
        sys.exit(f"{name}: errors")
    return rs
print(f"\nmedian (min–max) of {reps} repetition(s) of {seconds} s\n")
print("| workload | system | ops/s | p50 µs | p99 µs | ÷ Redis ops/s (same run) | per brick | ÷ paper's 128-brick total | ÷ paper per brick |")
print("|---|---|---|---|---|---|---|---|---|")
for w in ["paper-read", "paper-write"]:
    redis = load(f"redis-{w}")
    rops = [r["ops_per_sec"] for r in redis]
    print(f"| {w} | Redis (1 process) | {fmt(rops)} | {fmt([r['p50_us'] for r in redis], 1)} | {fmt([r['p99_us'] for r in redis], 1)} | 1.00 | | | |")
    for b in [1, 2, 4]:
        rs = load(f"dds-b{b}-{w}")
        ops = [r["ops_per_sec"] for r in rs]
        ratio = statistics.median([a / c for a, c in zip(ops, rops)])
        per = statistics.median(ops) / b
        reps_ = 2 if b >= 2 else 1
        print(f"| {w} | dds {b} brick(s), {reps_} replica(s) | {fmt(ops)} | {fmt([r['p50_us'] for r in rs], 1)} | {fmt([r['p99_us'] for r in rs], 1)} | {ratio:.2f} | {per:,.0f} | {statistics.median(ops) / paper[w]:.1f}x | {per / (paper[w] / 128):.0f}x |")
print(f"\npaper (128 bricks, 2 replicas, 500 MHz Pentium III, Java): reads {paper['paper-read']:,}/s, writes {paper['paper-write']:,}/s")
PY
