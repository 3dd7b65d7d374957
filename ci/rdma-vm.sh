#!/usr/bin/env bash
# Runs inside the soft-RoCE VM (ci/rdma.sh starts it through hw/qemu-rxe.sh): rxe0 must
# be active, every test in each BIN must pass over it, and hw/softroce.sh must take the
# device down and bring one up again.
#   ci/rdma-vm.sh BIN...
set -euo pipefail
ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE
echo "rxe0 active in the VM"
for bin in "$@"; do
  DDS_RDMA_EXPECT_DEVICE=1 "$bin" --nocapture --test-threads 1
done
bash hw/softroce.sh down rxe0
bash hw/softroce.sh up eth0 rxe1
bash hw/softroce.sh down rxe1
