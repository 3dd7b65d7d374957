#!/usr/bin/env bash
# dds side by side with Redis, memcached and the echo floor, in one run, with the same
# load generator: one dds brick on one core with one replica, Redis (single-threaded)
# and memcached with one worker thread, all on loopback. Prints the tables and writes
# bench/results/<date>.json plus plots. Everything it starts, it stops.
#   ci/bench.sh            full: 3 repetitions x 5 s per shape (about 16 minutes)
#   ci/bench.sh --quick    1 repetition x 2 s (under 5 minutes)
#   ci/bench.sh --smoke    seconds: keeps the harness from rotting (ci/test.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=full
case "${1:-}" in
  --quick) mode=quick ;;
  --smoke) mode=smoke ;;
  "") ;;
  *) echo "usage: ci/bench.sh [--quick|--smoke]" >&2; exit 2 ;;
esac
REDIS_PORT="${REDIS_PORT:-26379}"
MEMCACHED_PORT="${MEMCACHED_PORT:-21211}"
OUT="${BENCH_OUT:-bench/results}"

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v memcached >/dev/null || need+=(memcached)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  echo "ci/bench.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked
dds=target/release/dds
work="$(mktemp -d -t dds-bench-XXXXXX)"
pids=()
cleanup() {
  "$dds" cluster down --dir "$work/cluster" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --protected-mode no --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
pids+=($!)
memcached -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 -t 1 -m 1024 -c 4096 -u root >"$work/memcached.log" 2>&1 &
pids+=($!)
for i in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$MEMCACHED_PORT") 2>/dev/null && break
  [ "$i" = 100 ] && { echo "redis or memcached did not start:"; cat "$work"/*.log; exit 1; }
  sleep 0.1
done
# Memory durability: writes go to the log (page cache) but are not fsync'd, as Redis
# here (no AOF, no RDB) and memcached do not persist at all. ci/bench-log.sh measures
# sync durability against the disk's own fdatasync.
"$dds" cluster up --dir "$work/cluster" --bricks 1 --cores 1 --durability memory >/dev/null

echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "peers: $(redis-server --version | cut -d' ' -f1-3), memcached $(memcached -V | cut -d' ' -f2)"
"$dds" suite --mode "$mode" --cluster "$work/cluster" \
  --redis "127.0.0.1:$REDIS_PORT" --memcached "127.0.0.1:$MEMCACHED_PORT" --out "$OUT"
