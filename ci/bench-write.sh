#!/usr/bin/env bash
# The durable write path against its floors, measured in one run (issue 14's rows):
#   - 2 bricks x 2 replicas, sync, 1 client x depth 1, 64 B puts: p50 against the floor
#     fio (4 KiB write + fdatasync) p50 + the transport's echo round trip p50;
#     and, beside it, against two fio jobs syncing at once on the same disk (a local
#     cluster's two replicas share this machine's one disk) + the echo;
#   - 1 brick x 1 replica, sync, depth 1: put p50 against fio's p50;
#   - the paper's write shape (2 clients x 100 in flight, 150 B, 2 bricks x 2 replicas,
#     sync): ops/s and p99, against the same shape on `--against <commit>` if given
#     (built from git in a worktree), so both are measured in the same run.
# Repetitions interleaved; medians with min-max; prints a markdown table for PERF.md.
#   ci/bench-write.sh [--reps N] [--seconds S] [--against COMMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/against.sh
reps=3; seconds=3; against=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --against) against="$2"; shift 2 ;;
    *) echo "usage: ci/bench-write.sh [--reps N] [--seconds S] [--against COMMIT]" >&2; exit 2 ;;
  esac
done
if ! command -v fio >/dev/null; then
  echo "ci/bench-write.sh: installing fio" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
cargo build --release --locked
work="$(mktemp -d -t dds-bench-write-XXXXXX)"
declare -A bins=([new]="$PWD/target/release/dds")
if [ -n "$against" ]; then
  echo "ci/bench-write.sh: building $against for comparison" >&2
  bins[old]="$(build_against "$against" "$work")"
fi
cleanup() {
  for d in "$work"/*/c22 "$work"/*/c11; do [ -d "$d" ] && "${bins[new]}" cluster down --dir "$d" >/dev/null 2>&1 || true; done
  against_cleanup "$work"
  rm -rf "$work"
}
trap cleanup EXIT

# One bench run; prints "ops_per_s p50_us p99_us".
bench() {
  "$@" --seconds "$seconds" --warmup 1 2>/dev/null | awk '$1 != "workload" && NF >= 9 {print $4, $5, $6; exit}'
}
median() { sort -g | awk '{a[NR]=$1} END {m=a[int((NR+1)/2)]; printf "%.1f (%.1f-%.1f)", m, a[1], a[NR]}'; }
value() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "machine: $(nproc) cores, $(uname -r); filesystem: $(df -T "$work" | awk 'NR==2 {print $2, $1}'); $(fio --version)" >&2
: >"$work/results"
for rep in $(seq "$reps"); do
  echo "rep $rep/$reps" >&2
  fio --name=fdatasync --directory="$work" --filename=fio.dat --rw=write --bs=4k --size=64m \
    --fdatasync=1 --ioengine=sync --runtime="$seconds" --time_based --output-format=json >"$work/fio.json" 2>/dev/null
  rm -f "$work/fio.dat"
  python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['sync']['lat_ns']['percentile']; print('fio', j['50.000000']/1000)" "$work/fio.json" >>"$work/results"
  fio --name=fdatasync2 --directory="$work" --rw=write --bs=4k --size=64m --numjobs=2 --group_reporting \
    --fdatasync=1 --ioengine=sync --runtime="$seconds" --time_based --output-format=json >"$work/fio.json" 2>/dev/null
  rm -f "$work"/fdatasync2.*
  python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['sync']['lat_ns']['percentile']; print('fio2', j['50.000000']/1000)" "$work/fio.json" >>"$work/results"
  echo "echo $(bench "${bins[new]}" bench --target echo --clients 1 --depth 1 | cut -d' ' -f2)" >>"$work/results"
  for v in "${!bins[@]}"; do
    dds="${bins[$v]}"
    mkdir -p "$work/$v"
    "$dds" cluster up --dir "$work/$v/c22" --bricks 2 --replicas 2 --cores 1 --durability sync >/dev/null
    echo "$v-22-d1 $(bench "$dds" bench --cluster "$work/$v/c22" --workload write --clients 1 --depth 1)" >>"$work/results"
    echo "$v-paper $(bench "$dds" bench --cluster "$work/$v/c22" --workload paper-write --clients 2)" >>"$work/results"
    "$dds" cluster down --dir "$work/$v/c22" >/dev/null; rm -rf "$work/$v/c22"
    "$dds" cluster up --dir "$work/$v/c11" --bricks 1 --cores 1 --durability sync >/dev/null
    echo "$v-11-d1 $(bench "$dds" bench --cluster "$work/$v/c11" --workload write --clients 1 --depth 1)" >>"$work/results"
    "$dds" cluster down --dir "$work/$v/c11" >/dev/null; rm -rf "$work/$v/c11"
  done
done
col() { awk -v k="$1" -v c="$2" '$1 == k {print $c}' "$work/results"; }
fio_p50=$(col fio 2 | value); echo_p50=$(col echo 2 | value)
floor=$(echo "$fio_p50 + $echo_p50" | bc -l)
floor2=$(echo "$(col fio2 2 | value) + $echo_p50" | bc -l)
echo
echo "| what | p50 us | ops/s | p99 us | floor p50 us | ratio to floor |"
echo "|---|---|---|---|---|---|"
echo "| fio 4 KiB write + fdatasync | $(col fio 2 | median) | | | | |"
echo "| fio, two jobs at once on the same disk | $(col fio2 2 | median) | | | | |"
echo "| dds echo (same transport), 1 x 1 | $(col echo 2 | median) | | | | |"
for v in new old; do
  [ -n "${bins[$v]:-}" ] || continue
  label=$([ "$v" = new ] && echo "this build" || echo "$against")
  p=$(col "$v-22-d1" 3 | value)
  printf '| put 2 bricks x 2 replicas, 1 x 1, 64 B (%s) | %s | %s | %s | %.1f | %.2f |\n' "$label" "$(col "$v-22-d1" 3 | median)" "$(col "$v-22-d1" 2 | median)" "$(col "$v-22-d1" 4 | median)" "$floor" "$(echo "$p / $floor" | bc -l)"
  printf '| the same, against two fio jobs at once + echo (%s) | | | | %.1f | %.2f |\n' "$label" "$floor2" "$(echo "$p / $floor2" | bc -l)"
  p=$(col "$v-11-d1" 3 | value)
  printf '| put 1 brick x 1 replica, 1 x 1, 64 B (%s) | %s | %s | %s | %.1f | %.2f |\n' "$label" "$(col "$v-11-d1" 3 | median)" "$(col "$v-11-d1" 2 | median)" "$(col "$v-11-d1" 4 | median)" "$fio_p50" "$(echo "$p / $fio_p50" | bc -l)"
  printf '| paper write: 2 x 100, 150 B, 2 x 2 (%s) | %s | %s | %s | | |\n' "$label" "$(col "$v-paper" 3 | median)" "$(col "$v-paper" 2 | median)" "$(col "$v-paper" 4 | median)"
done
if [ -n "$against" ]; then
  printf '\npaper write ops/s, this build / %s: %.2f\n' "$against" "$(echo "$(col new-paper 2 | value) / $(col old-paper 2 | value)" | bc -l)"
fi
