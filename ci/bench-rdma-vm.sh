#!/usr/bin/env bash
# Runs inside the soft-RoCE VM (ci/bench-rdma.sh starts it): the verbs floor (perftest's
# ib_send_lat and ib_write_lat on rxe0, server and client in this VM) and dds's RDMA
# paths (the RC loopback and the RDMA transport's echo round trip, from the test binary
# BIN) and the TCP transport's echo round trip on the VM's loopback, and dds itself
# (the `dds` binary DDS, built with the rdma feature): gets and puts of 64 B values, one
# client at depth 1, against a one-brick cluster whose core busy-polls, over RDMA and
# over TCP against the same brick, and gets at 200/s (open loop) against a brick that
# polls adaptively, so it sleeps between them; REPS times each, interleaved. Prints one line per
# measurement:
#   <what> rep <n>: p50 <us> p99 <us>   (round trips; perftest's one-way figures doubled)
#   ci/bench-rdma-vm.sh BIN DDS REPS
set -euo pipefail
bin="$1"; dds="$2"; reps="${3:-3}"
# One dds operation kind over one transport: `dds bench` for 3 s (more flags may
# follow), its JSON's p50 and p99.
dds_op() {
  local cluster="$1" workload="$2" transport="$3"
  shift 3
  "$dds" bench --cluster "$cluster" --workload "$workload" --clients 1 --depth 1 --seconds 3 \
    --transport "$transport" --json "$cluster/bench.json" "$@" >/dev/null 2>&1
  local p50 p99
  p50="$(grep -o '"p50_us": [0-9.]*' "$cluster/bench.json" | head -n 1 | awk '{print $2}')"
  p99="$(grep -o '"p99_us": [0-9.]*' "$cluster/bench.json" | head -n 1 | awk '{print $2}')"
  printf 'p50 %.1f p99 %.1f\n' "$p50" "$p99"
}
perf() {
  local tool="$1" port="$2"
  "$tool" -d rxe0 -x 1 -s 32 -n 5000 -p "$port" >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local out
  out="$("$tool" -d rxe0 -x 1 -s 32 -n 5000 -p "$port" 127.0.0.1 2>/dev/null | awk '$1 == 32 {print $5, $8}')"
  wait "$server" || true
  # Columns: t_typical and 99% percentile, one way, in usec.
  set -- $out
  awk -v t="$1" -v p="$2" 'BEGIN {printf "p50 %.1f p99 %.1f\n", 2 * t, 2 * p}'
}
for rep in $(seq "$reps"); do
  echo "ib_send_lat (32 B) rep $rep: $(perf ib_send_lat $((18515 + rep)))"
  echo "ib_write_lat (32 B) rep $rep: $(perf ib_write_lat $((18615 + rep)))"
  DDS_RDMA_EXPECT_DEVICE=1 "$bin" --nocapture --test-threads 1 --exact \
    frames_cross_a_reliable_connected_queue_pair_byte_for_byte frames_of_every_size_echo_over_rdma_byte_for_byte \
    tcp_echo_round_trips_for_comparison 2>/dev/null |
    awk -v rep="$rep" '/rc loopback, 28-byte frames/ {print "dds RC loopback (28 B) rep " rep ": p50 " $(NF-4) " p99 " $(NF-1)}
                       /rdma transport, 28-byte frames/ {print "dds RDMA transport echo (28 B) rep " rep ": p50 " $(NF-6) " p99 " $(NF-3)}
                       /tcp transport, 28-byte frames/ {print "dds TCP transport echo, loopback (28 B) rep " rep ": p50 " $(NF-6) " p99 " $(NF-3)}'
  # dds after perftest, so perftest never shares the VM's two CPUs with a spinning brick.
  cluster="$(mktemp -d)"
  "$dds" cluster up --dir "$cluster" --bricks 1 --cores 1 --transport rdma --busy-poll >/dev/null 2>&1
  for transport in rdma tcp; do
    echo "dds get over $transport (64 B, 1 brick) rep $rep: $(dds_op "$cluster" read "$transport")"
    echo "dds put over $transport (64 B, 1 brick) rep $rep: $(dds_op "$cluster" write "$transport")"
  done
  "$dds" cluster down --dir "$cluster" >/dev/null 2>&1
  rm -rf "$cluster"
  # A brick that is idle between requests (adaptive polling, 200 gets/s open loop):
  # over RDMA it sleeps in epoll until the completion channel wakes it.
  cluster="$(mktemp -d)"
  "$dds" cluster up --dir "$cluster" --bricks 1 --cores 1 --transport rdma >/dev/null 2>&1
  for transport in rdma tcp; do
    echo "dds get over $transport, idle brick (200/s) rep $rep: $(dds_op "$cluster" read "$transport" --rate 200)"
  done
  "$dds" cluster down --dir "$cluster" >/dev/null 2>&1
  rm -rf "$cluster"
done
