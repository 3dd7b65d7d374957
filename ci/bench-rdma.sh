#!/usr/bin/env bash
# RDMA latency inside the soft-RoCE VM: perftest's verbs floor beside dds's RDMA paths
# (the bare queue pair, the transport's echo, and dds gets and puts over RDMA and over
# TCP against the same brick), all in one VM boot, REPS repetitions interleaved; prints a markdown table (median and
# range of the repetitions) for PERF.md. The VM emulates its CPU (qemu TCG): absolute
# figures are not what real hardware gives, the ratios are what to read.
#   ci/bench-rdma.sh [--reps N]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=3
[ "${1:-}" = "--reps" ] && reps="$2"
build_log="$(mktemp -t dds-rdma-build-XXXXXX.log)"
if ! cargo test --locked --release -p dds-transport --features rdma --test rdma --no-run >"$build_log" 2>&1; then
  cat "$build_log" >&2
  exit 1
fi
bin="$(grep -o 'target/release/deps/rdma-[0-9a-f]*' "$build_log" | tail -n 1)"
if ! cargo build --locked --release --features rdma --bin dds >"$build_log" 2>&1; then
  cat "$build_log" >&2
  exit 1
fi
rm -f "$build_log"
out="$(bash hw/qemu-rxe.sh --timeout 900 -- bash ci/bench-rdma-vm.sh "$bin" "$PWD/target/release/dds" "$reps")"
echo "$out" | grep " rep " >&2
echo
echo "round trips in the soft-RoCE VM, median (min–max) of $reps repetition(s); ratio: p50 over ib_send_lat's"
echo
echo "| path | p50 µs | p99 µs | p50 ÷ ib_send_lat |"
echo "|---|---|---|---|"
echo "$out" | grep " rep " | sed -E 's/ rep [0-9]+:/:/' | awk -F': ' '
  { split($2, f, " "); what = $1; p50[what] = p50[what] " " f[2]; p99[what] = p99[what] " " f[4]; if (!(what in seen)) { order[++n] = what; seen[what] = 1 } }
  function med(list,   a, k, i, j, t) { k = split(list, a, " "); for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }; return sprintf("%.1f (%.1f–%.1f)", a[int((k + 1) / 2)], a[1], a[k]) }
  function m(list,   a, k, i, j, t) { k = split(list, a, " "); for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }; return a[int((k + 1) / 2)] }
  END { base = m(p50["ib_send_lat (32 B)"]); for (i = 1; i <= n; i++) { w = order[i]; printf "| %s | %s | %s | %.2f |\n", w, med(p50[w]), med(p99[w]), m(p50[w]) / base } }'
