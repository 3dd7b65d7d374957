#!/usr/bin/env bash
# RDMA verbs for real: builds with `--features rdma` (installing cmake, libclang-dev,
# libibverbs-dev and pkg-config from Debian if missing), checks on this host that the
# probe fails with a clear reason (no kernel RDMA here: the TCP fallback's cue), then
# runs every RDMA test inside the throwaway soft-RoCE VM (hw/qemu-rxe.sh), where rxe0
# is a real verbs device, and takes hw/softroce.sh through down, up and down there.
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
cargo clippy --locked -p dds-transport --features rdma --all-targets -- -D warnings
build_log="$(mktemp -t dds-rdma-build-XXXXXX.log)"
if ! cargo test --locked -p dds-transport --features rdma --test rdma --no-run >"$build_log" 2>&1; then
  cat "$build_log" >&2
  exit 1
fi
bin="$(grep -o 'target/debug/deps/rdma-[0-9a-f]*' "$build_log" | tail -n 1)"
rm -f "$build_log"
[ -x "$bin" ] || { echo "ci/rdma.sh: test binary not found" >&2; exit 1; }

echo "== on this host (no RDMA): the probe must say why"
"$bin" --exact the_probe_finds_the_device_or_says_why_not --nocapture

echo "== in the soft-RoCE VM: rxe0 active, every RDMA test over it, then hw/softroce.sh down and up"
bash hw/qemu-rxe.sh --timeout 300 -- bash ci/rdma-vm.sh "$bin"
