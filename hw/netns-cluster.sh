#!/usr/bin/env bash
# A dds cluster across network namespaces, as on separate hosts: the map authority, three
# bricks and a client each in a namespace of their own, joined by veth pairs to a bridge
# in a hub namespace, on addresses only this script creates (10.211.0.0/24, reachable
# from nowhere else). Runs the replicated scenario end to end over that network: load,
# SIGKILL a brick, read everything and write more, restart it, wait for recovery, kill
# another, read everything again. Needs root and iproute2; cleans up after itself.
#   hw/netns-cluster.sh [--keys N]
set -euo pipefail
cd "$(dirname "$0")/.."
keys=300
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) keys="$2"; shift 2 ;;
    *) echo "usage: hw/netns-cluster.sh [--keys N]" >&2; exit 2 ;;
  esac
done
command -v ip >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; }
cargo build --release --locked
dds="$PWD/target/release/dds"
tag="dds$$"
hosts=(meta b0 b1 b2 client)
work="$(mktemp -d -t dds-netns-XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for h in "${hosts[@]}" hub; do ip netns del "$tag-$h" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ns() { local h="$1"; shift; ip netns exec "$tag-$h" "$@"; }

ip netns add "$tag-hub"
ns hub ip link add br0 type bridge
ns hub ip link set br0 up
ns hub ip link set lo up
for i in "${!hosts[@]}"; do
  h="${hosts[$i]}"
  ip netns add "$tag-$h"
  ip link add "v$i-$$" type veth peer name "p$i-$$"
  ip link set "v$i-$$" netns "$tag-$h"
  ip link set "p$i-$$" netns "$tag-hub"
  ns hub ip link set "p$i-$$" master br0 up
  ns "$h" ip link set lo up
  ns "$h" ip link set "v$i-$$" name eth0
  ns "$h" ip addr add "10.211.0.$((i + 1))/24" dev eth0
  ns "$h" ip link set eth0 up
done
addr_of() { echo "10.211.0.$(( $1 + 1 ))"; }
META="$(addr_of 0):7100"

start_meta() {
  # `ip netns exec` directly (not through a function) so that $! is the server's pid.
  ip netns exec "$tag-meta" "$dds" meta --dir "$work/meta" --listen "$META" --bricks 3 --replicas 2 \
    --secret-file "$work/secret" >>"$work/meta.log" 2>&1 &
  pids+=($!)
  disown $!
}
brick_pid=()
start_brick() {
  local i="$1"
  ip netns exec "$tag-b$i" "$dds" brick --dir "$work/b$i" --listen "$(addr_of $((i + 1))):7000" --meta "$META" --cores 1 --id "$i" \
    --secret-file "$work/secret" >>"$work/b$i.log" 2>&1 &
  brick_pid[$i]=$!
  pids+=($!)
  disown $!
}
# The cluster's secret, as for processes started by hand on separate hosts.
"$dds" secret "$work/secret" >/dev/null
start_meta
for i in 0 1 2; do start_brick "$i"; done
seeds=(--addr "$META" --addr "$(addr_of 1):7000" --addr "$(addr_of 2):7000" --addr "$(addr_of 3):7000")
client() { ns client "$dds" "$@" "${seeds[@]}" --secret-file "$work/secret"; }
# The cluster serves once the authority has its first map.
for _ in $(seq 100); do client put ready yes >/dev/null 2>&1 && break; sleep 0.1; done
check_range() {
  local from="$1" to="$2" prefix="$3" bad=0
  for k in $(seq "$from" "$to"); do
    [ "$(client get "$prefix$k")" = "value-$k" ] || bad=$((bad + 1))
  done
  echo "$bad"
}
# A client without the secret, from its own host, is refused by every process.
for at in "$META" "$(addr_of 1):7000"; do
  said="$(ns client "$dds" get ready --addr "$at" 2>&1 || true)"
  case "$said" in *"requires the cluster's secret"*) ;; *) echo "netns: a client without the secret was not refused by $at: $said" >&2; exit 1 ;; esac
done
echo "netns: a client without the secret is refused by the authority and a brick"
echo "netns: 3 bricks on 10.211.0.2-4, authority on 10.211.0.1, client on 10.211.0.5; loading $keys keys"
for k in $(seq 1 "$keys"); do client put "k$k" "value-$k" >/dev/null; done
kill -9 "${brick_pid[1]}"
t0=$(date +%s%N)
until client put after-kill value-0 >/dev/null 2>&1; do sleep 0.01; done
echo "netns: brick 1 killed; first write accepted after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
bad=$(check_range 1 "$keys" k); [ "$bad" = 0 ] || { echo "netns: $bad keys wrong after the kill" >&2; exit 1; }
for k in $(seq 1 200); do client put "d$k" "value-$k" >/dev/null; done
start_brick 1
for _ in $(seq 600); do
  grep -q "copied partition(s) now serve reads" "$work/meta.log" && break
  sleep 0.1
done
grep -q "copied partition(s) now serve reads" "$work/meta.log" || { echo "netns: brick 1 never recovered" >&2; tail "$work/meta.log" >&2; exit 1; }
echo "netns: brick 1 recovered: $(grep 'meta: recovery:' "$work/meta.log" | tail -1 | sed 's/.*meta: //')"
kill -9 "${brick_pid[0]}"
sleep 0.2
bad=$(( $(check_range 1 "$keys" k) + $(check_range 1 200 d) ))
[ "$bad" = 0 ] || { echo "netns: $bad keys wrong after the second kill" >&2; exit 1; }
echo "netns: all $((keys + 200)) keys read back across namespaces after two kills and a recovery"
echo "netns: 1 passed, 0 failed"
