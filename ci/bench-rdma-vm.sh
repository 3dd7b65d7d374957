#!/usr/bin/env bash
# Runs inside the soft-RoCE VM (ci/bench-rdma.sh starts it): the verbs floor (perftest's
# ib_send_lat and ib_write_lat on rxe0, server and client in this VM) and dds's RDMA
# paths (the RC loopback and the RDMA transport's echo round trip, from the test binary
# BIN) and the TCP transport's echo round trip on the VM's loopback, REPS times each,
# interleaved. Prints one line per measurement:
#   <what> rep <n>: p50 <us> p99 <us>   (round trips; perftest's one-way figures doubled)
#   ci/bench-rdma-vm.sh BIN REPS
set -euo pipefail
bin="$1"; reps="${2:-3}"
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
done
