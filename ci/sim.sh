#!/usr/bin/env bash
# The deterministic simulator (src/sim): a whole cluster in one thread with simulated
# network, disk and clock, faults drawn from each seed, checkers after every run.
#   ci/sim.sh --seeds N                 N seeds from 1; prints "N passed, 0 failed"
#   ci/sim.sh --seeds N --start S       N seeds from S (a longer run: --seeds 100000)
#   ci/sim.sh --seed S                  replay one seed with its trace (the failure line
#                                       prints this command)
#   ci/sim.sh --seed S --watch key-3    ... and every request on one key
#   ci/sim.sh --regressions ci/sim-regressions.txt
#   ci/sim.sh --seeds N --twice         every seed twice: equal digests (determinism)
#   ci/sim.sh --seeds N --durability memory   bricks that acknowledge before fdatasync
#                                       (crashes are then process crashes, not power losses)
#   ci/sim.sh --seeds N --mutation read-uncommitted|skip-sync|lost-commit|early-replies|stale-lease|skip-probe|read-past-prepared|checkpoint-forgets-decisions|uncommitted-map|keep-left-data|repair-keeps-removed|trim-live-segments|clean-moves-dead --expect-failure
#                                       a planted bug the checkers must catch
#   ci/sim.sh --seeds N --partitions    also network partitions, and the authority's
#                                       leader cut off from the other members (beyond
#                                       the design's assumptions; see ARCHITECTURE.md)
#   ci/sim.sh --seeds N --raw-network   frames duplicated or reordered within a connection
#                                       (beyond TCP; the checkers must catch what breaks)
# Builds `dds-sim` (cargo feature `sim`, which the `dds` binary never has) first.
set -euo pipefail
cd "$(dirname "$0")/.."
build_log="$(mktemp -t dds-sim-build-XXXXXX.log)"
if ! cargo build --release --locked --features sim --bin dds-sim 2>"$build_log"; then
  cat "$build_log" >&2
  exit 1
fi
rm -f "$build_log"
exec target/release/dds-sim "$@"
