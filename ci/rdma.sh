#!/usr/bin/env bash
# RDMA verbs for real: builds with `--features rdma` (installing cmake, libclang-dev,
# libibverbs-dev and pkg-config from Debian if missing), checks on this host that the
# probe fails with a clear reason (no kernel RDMA here: the TCP fallback's cue) and
# that a cluster asked for RDMA falls back to TCP, then runs every RDMA test inside the
# throwaway soft-RoCE VM (hw/qemu-rxe.sh), where rxe0 is a real verbs device: the
# transport's tests and a 3-brick, 2-replica cluster over RDMA through a kill and a
# recovery (tests/rdma_cluster.rs); and takes hw/softroce.sh through down, up and
# down there.
#   ci/rdma.sh
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(cmake libclang-dev libibverbs-dev pkg-config)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "ci/rdma.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo clippy --locked --workspace --features rdma --all-targets -- -D warnings
# Test binaries built on the host, run in the VM (its root is this machine's, read-only).
# rdma_cluster drives the `dds` binary, which cargo builds with the same features.
test_bin() {
  local log
  log="$(mktemp -t dds-rdma-build-XXXXXX.log)"
  if ! cargo test --locked "$@" --no-run >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  grep -o 'target/debug/deps/[a-z_]*-[0-9a-f]*' "$log" | tail -n 1
  rm -f "$log"
}
transport_bin="$(test_bin -p dds-transport --features rdma --test rdma)"
cluster_bin="$(test_bin -p dds --features rdma --test rdma_cluster)"
for bin in "$transport_bin" "$cluster_bin"; do
  [ -x "$bin" ] || { echo "ci/rdma.sh: test binary $bin not found" >&2; exit 1; }
done

echo "== on this host (no RDMA): the probe must say why, and a cluster asked for RDMA falls back to TCP"
"$transport_bin" --exact the_probe_finds_the_device_or_says_why_not --nocapture
"$cluster_bin" --nocapture

echo "== in the soft-RoCE VM: rxe0 active, every RDMA test over it (transport, then a 3-brick cluster), then hw/softroce.sh down and up"
bash hw/qemu-rxe.sh --timeout 600 -- bash ci/rdma-vm.sh "$transport_bin" "$cluster_bin"
