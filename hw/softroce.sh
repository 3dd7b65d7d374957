#!/usr/bin/env bash
# Soft-RoCE on a real Linux host (one whose kernel has rdma_rxe; CI's does not, which is
# why hw/qemu-rxe.sh exists): creates an rxe device on a network interface, checks it
# with ibv_devinfo, and undoes it. Needs root, iproute2's `rdma` and ibverbs-utils.
#   hw/softroce.sh up IFACE [NAME]    load rdma_rxe, create NAME (default rxe0) on IFACE
#   hw/softroce.sh status [NAME]      ibv_devinfo of NAME: state and GIDs
#   hw/softroce.sh down [NAME]        delete NAME (and unload rdma_rxe if nothing uses it)
# After `up`, run dds with `--transport rdma` (or `auto`) and the RDMA tests directly:
#   DDS_RDMA_EXPECT_DEVICE=1 cargo test -p dds-transport --features rdma --test rdma
set -euo pipefail
usage() { sed -n 2,10p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd="$1"; shift
need() { command -v "$1" >/dev/null || { echo "hw/softroce.sh: $1 not found (Debian: apt-get install $2)" >&2; exit 1; }; }
need rdma iproute2
need ibv_devinfo ibverbs-utils
case "$cmd" in
  up)
    [ $# -ge 1 ] || usage
    iface="$1"; name="${2:-rxe0}"
    ip link show "$iface" >/dev/null 2>&1 || { echo "hw/softroce.sh: no interface $iface" >&2; exit 1; }
    if ! modprobe rdma_rxe 2>/dev/null; then
      echo "hw/softroce.sh: this kernel has no rdma_rxe module (CONFIG_RDMA_RXE); use hw/qemu-rxe.sh instead" >&2
      exit 1
    fi
    if rdma link show "$name/1" >/dev/null 2>&1; then
      echo "hw/softroce.sh: $name already exists"
    else
      rdma link add "$name" type rxe netdev "$iface"
    fi
    for _ in $(seq 50); do
      ibv_devinfo -d "$name" 2>/dev/null | grep -q PORT_ACTIVE && break
      sleep 0.1
    done
    ibv_devinfo -d "$name" | grep -E "hca_id|state|active_mtu|link_layer"
    ibv_devinfo -d "$name" | grep -q PORT_ACTIVE || { echo "hw/softroce.sh: $name is not active" >&2; exit 1; }
    echo "hw/softroce.sh: $name is active on $iface"
    ;;
  status)
    name="${1:-rxe0}"
    ibv_devinfo -v -d "$name" | grep -E "hca_id|state|active_mtu|link_layer|GID\[" || { echo "hw/softroce.sh: no device $name" >&2; exit 1; }
    ;;
  down)
    name="${1:-rxe0}"
    if rdma link show "$name/1" >/dev/null 2>&1; then
      rdma link delete "$name"
      echo "hw/softroce.sh: $name deleted"
    else
      echo "hw/softroce.sh: no device $name"
    fi
    if ! rdma link show 2>/dev/null | grep -q .; then
      modprobe -r rdma_rxe 2>/dev/null || true
    fi
    ;;
  *) usage ;;
esac
