#!/usr/bin/env bash
# What authentication costs per request: get p50 at depth 1 (one client) on a brick
# that requires the cluster's secret and on one that runs open, in the same run,
# interleaved, each repeated. Prints the
# medians, their spread and the ratio (PERF.md, "Authentication"). Everything it
# starts, it stops.
#
#   ci/bench-auth.sh [--reps N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."

reps=5
seconds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    *) echo "usage: $0 [--reps N] [--seconds S]" >&2; exit 2 ;;
  esac
done

cargo build --release --locked --quiet
dds=target/release/dds
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A secret as `cluster up` makes one (a throwaway one-brick cluster's).
"$dds" cluster up --dir "$work/gen" --bricks 1 >/dev/null
cp "$work/gen/secret" "$work/secret"
chmod 600 "$work/secret"
"$dds" cluster down --dir "$work/gen" >/dev/null

start() { # name, extra args...: starts a one-core brick alone in the background
  local name="$1"; shift
  "$dds" brick --dir "$work/$name" --cores 1 --no-pin --listen 127.0.0.1:0 "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
}
addr_of() { # name: core 0's address, once the brick serves
  for _ in $(seq 1 200); do
    [ -s "$work/$1/brick.json" ] && break
    sleep 0.05
  done
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['addrs'][0])" "$work/$1/brick.json"
}
start open
start auth --secret-file "$work/secret"
open_addr="$(addr_of open)"
auth_addr="$(addr_of auth)"

run() { # addr, json, extra args...
  local addr="$1" json="$2"; shift 2
  "$dds" bench --addr "$addr" "$@" --workload read --clients 1 --depth 1 --keys 1000 \
    --seconds "$seconds" --warmup 1 --json "$json" >/dev/null
}
for i in $(seq 1 "$reps"); do
  run "$open_addr" "$work/open-$i.json"
  run "$auth_addr" "$work/auth-$i.json" --secret-file "$work/secret"
done

python3 - "$work" "$reps" <<'EOF'
import json, statistics, sys
work, reps = sys.argv[1], int(sys.argv[2])
def p50s(kind):
    return [json.load(open(f"{work}/{kind}-{i}.json"))["get"]["p50_us"] for i in range(1, reps + 1)]
o, a = p50s("open"), p50s("auth")
mo, ma = statistics.median(o), statistics.median(a)
print(f"get p50 at depth 1, {reps} runs each, interleaved (median, min-max):")
print(f"  open brick:          {mo:7.1f} us  ({min(o):.1f}-{max(o):.1f})")
print(f"  authenticated brick: {ma:7.1f} us  ({min(a):.1f}-{max(a):.1f})")
print(f"  authenticated / open: {ma / mo:.3f}")
EOF
