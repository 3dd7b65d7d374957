#!/usr/bin/env bash
# Runs a command inside a throwaway VM that has a real soft-RoCE device (rxe0 on eth0),
# for RDMA tests on machines whose kernel has no RDMA. The VM is Debian's kernel under
# qemu (TCG), with a busybox initramfs that loads virtio, 9p and rdma_rxe, mounts this
# machine's / read-only over 9p and chroots into it, so the command runs this machine's
# binaries in the current directory, with TMPDIR on a fresh writable tmpfs (/var/tmp). Prints the command's output; exits with its status.
#
#   hw/qemu-rxe.sh [--timeout SECONDS] [--mem MB] -- CMD [ARGS...]
#
# Bounded in time (default 600 s); leaves nothing running. The VM's network is qemu's
# user-mode network with restrict=on: nothing leaves the VM; rxe0 talks to itself.
set -euo pipefail
timeout_s=600
mem_mb=2048
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_s="$2"; shift 2 ;;
    --mem) mem_mb="$2"; shift 2 ;;
    --) shift; break ;;
    -*) echo "usage: hw/qemu-rxe.sh [--timeout S] [--mem MB] -- CMD [ARGS...]" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "hw/qemu-rxe.sh: no command given" >&2; exit 2; }

packages=(qemu-system-x86 linux-image-amd64 busybox-static rdma-core ibverbs-utils ibverbs-providers perftest iproute2 kmod cpio xz-utils zstd)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "hw/qemu-rxe.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's kernel (the host's own kernel may not be the one with modules here).
kver="$(ls /lib/modules | grep -E 'amd64$' | sort -V | tail -n 1)"
[ -n "$kver" ] && [ -e "/boot/vmlinuz-$kver" ] || { echo "hw/qemu-rxe.sh: no Debian kernel found" >&2; exit 1; }

work="$(mktemp -d -t dds-qemu-rxe-XXXXXX)"
qemu_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The initramfs: busybox, the modules in dependency order, and /init.
root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,modules}
cp /bin/busybox "$root/bin/busybox"
: >"$root/modules.order"
for m in crc32_generic virtio_pci virtio_net 9pnet_virtio 9p ib_uverbs rdma_rxe; do
  modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' | while read -r ko; do
    name="$(basename "$ko")"
    name="${name%.xz}"; name="${name%.zst}"
    grep -qx "$name" "$root/modules.order" && continue
    case "$ko" in
      *.xz) xz -dc "$ko" >"$root/modules/$name" ;;
      *.zst) zstd -qdc "$ko" >"$root/modules/$name" ;;
      *) cp "$ko" "$root/modules/$name" ;;
    esac
    echo "$name" >>"$root/modules.order"
  done
done

result="$work/result"
mkdir -p "$result"
# The command, run from the current directory inside the chroot.
{
  echo "cd $(printf '%q' "$PWD") || exit 125"
  echo "export TMPDIR=/var/tmp"
  printf '%q ' "$@"
  echo
} >"$result/cmd"

cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in \$(cat /modules.order); do insmod /modules/\$m 2>/dev/null || echo "qemu-rxe: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /mnt
for d in proc sys dev; do mount --bind /\$d /mnt/\$d; done
mount -t tmpfs scratch /mnt/var/tmp
mount -t 9p -o trans=virtio,version=9p2000.L result /mnt$result
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
chroot /mnt /bin/sh -c 'rdma link add rxe0 type rxe netdev eth0 && sh $result/cmd' >/mnt$result/out 2>&1
echo \$? >/mnt$result/status
sync
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg,thread=multi -m "$mem_mb" -smp 2 \
  -kernel "/boot/vmlinuz-$kver" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 rdinit=/init" \
  -nographic -no-reboot -monitor none -serial file:"$work/console.log" \
  -nic user,model=virtio-net-pci,restrict=on \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$result",mount_tag=result,security_model=none,multidevs=remap &
qemu_pid=$!
set +e
wait "$qemu_pid"
qemu_status=$?
set -e
qemu_pid=""

[ -f "$result/out" ] && cat "$result/out"
if [ ! -f "$result/status" ]; then
  echo "hw/qemu-rxe.sh: the VM ended without a result (qemu exit $qemu_status); console:" >&2
  tail -n 40 "$work/console.log" >&2 || true
  exit 1
fi
exit "$(cat "$result/status")"
