#!/usr/bin/env bash
# Bricks that hold more than memory (issue 18's bench): one brick (1 core, 1 replica)
# keeping its values in the log with --cache-mb (64), loaded with --keys values of
# --value-size bytes (4,000,000 of 1 KiB: about 4 GiB). Prints, in one run: the brick's
# resident memory after the load; uniform random gets at 16 and 64 in flight (page
# cache warm, then dropped: cold), beside fio's random 4 KiB reads (io_uring, same
# depths) of a file as large on the same file system, buffered and O_DIRECT; a zipfian
# run (YCSB-B: 95% gets) with the cache's hit rate; the restart time (index snapshot
# and replay); and Redis (one process, no persistence) loaded by the same generator:
# resident memory and gets. Markdown for PERF.md.
#   ci/bench-storage.sh [--keys N] [--value-size B] [--cache-mb M] [--seconds S] [--no-redis]
set -euo pipefail
cd "$(dirname "$0")/.."
keys=4000000; value_size=1024; cache_mb=64; seconds=5; redis=1
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) keys="$2"; shift 2 ;;
    --value-size) value_size="$2"; shift 2 ;;
    --cache-mb) cache_mb="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --no-redis) redis=0; shift ;;
    *) echo "usage: ci/bench-storage.sh [--keys N] [--value-size B] [--cache-mb M] [--seconds S] [--no-redis]" >&2; exit 2 ;;
  esac
done
need=()
command -v fio >/dev/null || need+=(fio)
[ "$redis" = 0 ] || command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "ci/bench-storage.sh: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -q
dds="$PWD/target/release/dds"
work="$(mktemp -d -t dds-bench-storage-XXXXXX)"
redis_port=$((20000 + RANDOM % 10000))
cleanup() {
  "$dds" cluster down --dir "$work/c" >/dev/null 2>&1 || true
  [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
rss_mib() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
brick_pid() { pgrep -f -- "--dir $work/c/brick-0" | head -1; }
# Drops the page cache (root only; elsewhere the "cold" rows are warm, and say so).
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null && echo cold || echo "warm (could not drop caches)"; }
# `name ops/s p50 p99` from a bench report.
row() { python3 -c 'import json,sys; r=json.load(open(sys.argv[2])); assert not r["errors"], r; print(sys.argv[1], round(r["ops_per_sec"]), r["p50_us"], r["p99_us"])' "$1" "$2"; }
# Gets and misses served so far, from `cluster status`.
cache_counts() { "$dds" cluster status --dir "$work/c" | python3 -c 'import re,sys; m=re.search(r"values in the log: (\d+) of (\d+) gets", sys.stdin.read()); print(m.group(1), m.group(2))'; }
results="$work/results"; : >"$results"
echo "machine: $(nproc) cores, $(uname -r), $(free -g | awk '/^Mem:/ {print $2}') GiB; $keys values of $value_size B, --cache-mb $cache_mb" >&2

"$dds" cluster up --dir "$work/c" --bricks 1 --replicas 1 --cores 1 --cache-mb "$cache_mb" >/dev/null
bench() { "$dds" bench --cluster "$work/c" --keys "$keys" --value-size "$value_size" --clients 1 --seconds "$seconds" --warmup 1 "$@"; }
echo "ci/bench-storage.sh: loading $keys values (the first run's preload)" >&2
load_started=$SECONDS
bench --workload read --depth 64 --json "$work/load.json" >/dev/null
echo "load_s $((SECONDS - load_started))" >>"$results"
echo "rss_mib $(rss_mib "$(brick_pid)")" >>"$results"
echo "log_mib $(du -sm "$work/c/brick-0" | cut -f1)" >>"$results"
for depth in 16 64; do
  bench --workload read --depth "$depth" --no-preload --json "$work/warm-$depth.json" >/dev/null
  row "dds_warm_$depth" "$work/warm-$depth.json" >>"$results"
done
for depth in 16 64; do
  echo "state_$depth $(drop_caches)" >>"$results"
  bench --workload read --depth "$depth" --no-preload --json "$work/cold-$depth.json" >/dev/null
  row "dds_cold_$depth" "$work/cold-$depth.json" >>"$results"
done
read -r hits0 gets0 < <(cache_counts)
bench --workload ycsb-b --depth 16 --no-preload --json "$work/ycsb-b.json" >/dev/null
row dds_ycsb_b "$work/ycsb-b.json" >>"$results"
read -r hits1 gets1 < <(cache_counts)
echo "ycsb_b_hits $((hits1 - hits0)) $((gets1 - gets0))" >>"$results"
echo "rss_after_mib $(rss_mib "$(brick_pid)")" >>"$results"
old_pid=$(brick_pid)
"$dds" cluster kill --dir "$work/c" --brick 0 >/dev/null
for _ in $(seq 100); do kill -0 "$old_pid" 2>/dev/null || break; sleep 0.1; done
restart_started=$(date +%s%N)
"$dds" cluster restart --dir "$work/c" --brick 0 >/dev/null
echo "restart_ms $(( ($(date +%s%N) - restart_started) / 1000000 )) $(grep -o 'recovered [0-9]* keys in [0-9]* ms' "$work/c/brick-0/brick.log" | tail -1 | awk '{print $5}')" >>"$results"
"$dds" cluster down --dir "$work/c" >/dev/null
rm -rf "$work/c"

# fio: random 4 KiB reads of a file as large as the values, same file system.
size_mib=$(( keys * value_size / 1048576 ))
echo "ci/bench-storage.sh: fio on a ${size_mib} MiB file" >&2
fio --name=lay --filename="$work/fio.dat" --rw=write --bs=1M --size="${size_mib}M" --ioengine=psync --end_fsync=1 >/dev/null
for direct in 0 1; do
  for depth in 16 64; do
    fio --name=rr --filename="$work/fio.dat" --rw=randread --bs=4k --size="${size_mib}M" --ioengine=io_uring --iodepth="$depth" \
      --direct="$direct" --runtime="$seconds" --time_based --output-format=json 2>/dev/null >"$work/fio.json"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print(sys.argv[2], round(r["iops"]), r["clat_ns"]["percentile"]["50.000000"]/1000, r["clat_ns"]["percentile"]["99.000000"]/1000)' \
      "$work/fio.json" "fio_direct${direct}_$depth" >>"$results"
  done
done
rm -f "$work/fio.dat"

if [ "$redis" = 1 ]; then
  echo "ci/bench-storage.sh: Redis" >&2
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --protected-mode no --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
  redis_pid=$!
  sleep 0.5
  "$dds" bench --target "redis://127.0.0.1:$redis_port" --workload read --keys "$keys" --value-size "$value_size" --clients 1 --depth 16 --seconds "$seconds" --warmup 1 --json "$work/redis.json" >/dev/null
  row redis_16 "$work/redis.json" >>"$results"
  echo "redis_rss_mib $(rss_mib "$redis_pid")" >>"$results"
  kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=""
fi

python3 - "$results" "$keys" "$value_size" "$cache_mb" <<'PY'
import sys
path, keys, vsize, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = {}
for line in open(path):
    f = line.split()
    r[f[0]] = f[1:]
data_mib = keys * vsize / 2**20
print(f"{keys:,} values of {vsize} B ({data_mib:,.0f} MiB), one brick, 1 core, --cache-mb {cache}; load {r['load_s'][0]} s; log on disk {int(r['log_mib'][0]):,} MiB\n")
print("| process | resident MiB | bytes per key |")
print("|---|---|---|")
rss = int(r["rss_mib"][0])
print(f"| dds brick after the load | {rss:,} | {rss * 2**20 / keys:,.0f} |")
print(f"| dds brick after the runs | {int(r['rss_after_mib'][0]):,} | {int(r['rss_after_mib'][0]) * 2**20 / keys:,.0f} |")
if "redis_rss_mib" in r:
    rr = int(r["redis_rss_mib"][0])
    print(f"| Redis, same data | {rr:,} | {rr * 2**20 / keys:,.0f} |")
print()
print("| reads | in flight | ops/s | p50 µs | p99 µs | ops/s ÷ fio's (buffered for warm, O_DIRECT for cold) |")
print("|---|---|---|---|---|---|")
for depth in (16, 64):
    # Warm page cache against fio's buffered reads; cold against O_DIRECT (the device).
    for kind, fio in (("warm", "fio_direct0"), ("cold", "fio_direct1")):
        name = f"dds_{kind}_{depth}"
        if name not in r:
            continue
        ops, p50, p99 = r[name]
        f = r.get(f"{fio}_{depth}")
        state = r.get(f"state_{depth}", ["warm"])[0] if kind == "cold" else "warm"
        ratio = f"{int(ops) / int(f[0]):.2f} (fio {int(f[0]):,})" if f else "-"
        print(f"| dds gets, uniform, page cache {state} | {depth} | {int(ops):,} | {float(p50):.1f} | {float(p99):.1f} | {ratio} |")
for direct in (0, 1):
    for depth in (16, 64):
        name = f"fio_direct{direct}_{depth}"
        if name in r:
            ops, p50, p99 = r[name]
            print(f"| fio randread 4 KiB, {'O_DIRECT' if direct else 'buffered'} | {depth} | {int(ops):,} | {float(p50):.1f} | {float(p99):.1f} | |")
if "redis_16" in r:
    ops, p50, p99 = r["redis_16"]
    print(f"| Redis gets, uniform | 16 | {int(ops):,} | {float(p50):.1f} | {float(p99):.1f} | |")
ops, p50, p99 = r["dds_ycsb_b"]
hits, gets = map(int, r["ycsb_b_hits"])
print(f"\nYCSB-B (zipfian, 95% gets, 16 in flight): {int(ops):,} ops/s, p50 {float(p50):.1f} µs, p99 {float(p99):.1f} µs; "
      f"the cache served {hits:,} of {gets:,} gets ({100 * hits / max(gets, 1):.1f}%)")
print(f"Restart (SIGKILL, then `cluster restart` until it serves): {int(r['restart_ms'][0]):,} ms; the core's recovery {r['restart_ms'][1] if len(r['restart_ms']) > 1 else '?'} ms")
PY
