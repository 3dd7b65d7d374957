#!/usr/bin/env bash
# A dds cluster across network namespaces, as on separate hosts: the map authority's three
# raft members (m1-m3), three bricks (b0-b2) and a client each in a namespace of their own,
# joined by veth pairs to a bridge in a hub namespace, on addresses only this script
# creates (10.211.0.0/24, reachable from nowhere else: members on .1-.3, bricks on .4-.6,
# the client on .7). Bricks and the client are given every member's address. Runs the
# replicated scenario end to end over that network: load, SIGKILL a brick, read
# everything and write more, restart it, wait for its recovery (reported by whichever
# member leads), kill another brick, read everything again. Then the authority: find its
# leader (the highest term in the members' "elected leader for term" log lines), SIGKILL
# the leader's process in its namespace and write on meanwhile (the first accepted write,
# the longest stall between accepted writes, when the new leader was elected and how long
# the bricks were fenced are printed), check the new leader is another member, write and
# read everything back, restart the killed member in its namespace with the same flags
# and directory, wait for it to follow the new leader (its log's "follows member" line
# for the leader's term), and read everything once more. Then its membership: a fourth
# member joins from a namespace of its own (m4, on .8: `dds meta --join`), the member that
# was killed leaves (`dds members --remove`, through the new one) and is stopped, every
# member lists the same group of three, and the cluster serves on. Every wait is bounded
# in tries and time, and fails with the tails of the logs. Needs root and iproute2; cleans up
# after itself.
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
hosts=(m1 m2 m3 b0 b1 b2 client m4)
work="$(mktemp -d -t dds-netns-XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for h in "${hosts[@]}" hub; do ip netns del "$tag-$h" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ns() { local h="$1"; shift; ip netns exec "$tag-$h" "$@"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

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
# Member m (1-3) on 10.211.0.m, brick i (0-2) on 10.211.0.(4+i), the client on .7, the
# member that joins later (4) on .8.
member_addr() { if [ "$1" = 4 ]; then echo "10.211.0.8:7100"; else echo "10.211.0.$1:7100"; fi; }
brick_addr() { echo "10.211.0.$(( $1 + 4 )):7000"; }
members=(1 2 3)
member_flags=()
meta_flags=()
for m in "${members[@]}"; do
  member_flags+=(--member "$m=$(member_addr "$m")")
  meta_flags+=(--meta "$(member_addr "$m")")
done
member_logs=()
for m in "${members[@]}"; do member_logs+=("$work/m$m.log"); done

# Fails the run: the message, then the tail of each log named after it (without the
# lines of single partitions' copies, which would fill it).
fail() {
  local why="$1"; shift
  echo "netns: FAILED: $why" >&2
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "--- tail of $(basename "$f")" >&2
    grep -v "copied partition [01]\|caught up partition [01]\|joining partition [01]" "$f" | tail -n 25 >&2
  done
  echo "netns: 0 passed, 1 failed" >&2
  exit 1
}

member_pid=()
start_member() {
  local m="$1"
  # `ip netns exec` directly (not through a function) so that $! is the server's pid.
  ip netns exec "$tag-m$m" "$dds" meta --id "$m" "${member_flags[@]}" --dir "$work/m$m" --listen "$(member_addr "$m")" \
    --bricks 3 --replicas 2 --secret-file "$work/secret" >>"$work/m$m.log" 2>&1 &
  member_pid[$m]=$!
  pids+=($!)
  disown $!
}
brick_pid=()
start_brick() {
  local i="$1"
  ip netns exec "$tag-b$i" "$dds" brick --dir "$work/b$i" --listen "$(brick_addr "$i")" "${meta_flags[@]}" --cores 1 --id "$i" \
    --secret-file "$work/secret" >>"$work/b$i.log" 2>&1 &
  brick_pid[$i]=$!
  pids+=($!)
  disown $!
}
# The cluster's secret, as for processes started by hand on separate hosts.
"$dds" secret "$work/secret" >/dev/null
for m in "${members[@]}"; do start_member "$m"; done
for i in 0 1 2; do start_brick "$i"; done
seeds=()
for m in "${members[@]}"; do seeds+=(--addr "$(member_addr "$m")"); done
for i in 0 1 2; do seeds+=(--addr "$(brick_addr "$i")"); done
client() { ns client timeout 10 "$dds" "$@" "${seeds[@]}" --secret-file "$work/secret"; }
all_logs() { echo "${member_logs[@]}" "$work"/b?.log; }

# The leader as "TERM ID": the highest term of any member's "elected leader" line (empty
# before the first election).
leader() {
  cat "${member_logs[@]}" 2>/dev/null | sed -n 's/.*member \([0-9]*\) elected leader for term \([0-9]*\).*/\2 \1/p' | sort -n | tail -n 1
}
# Runs CMD until it succeeds: at most TRIES times and SECONDS seconds, PAUSE between tries.
# Returns 1 if it never did.
retry() {
  local tries="$1" seconds="$2" pause="$3"; shift 3
  local deadline=$(( $(now_ms) + seconds * 1000 ))
  for _ in $(seq "$tries"); do
    "$@" && return 0
    [ "$(now_ms)" -lt "$deadline" ] || return 1
    sleep "$pause"
  done
  return 1
}

# The cluster serves once the authority has elected a leader and made its first map.
retry 300 60 0.1 client put ready yes >/dev/null 2>&1 || fail "the cluster never accepted a first write" $(all_logs)
check_range() {
  local from="$1" to="$2" prefix="$3" bad=0
  for k in $(seq "$from" "$to"); do
    [ "$(client get "$prefix$k" 2>/dev/null)" = "value-$k" ] || bad=$((bad + 1))
  done
  echo "$bad"
}
# A client without the secret, from its own host, is refused by every process.
for at in "$(member_addr 1)" "$(brick_addr 0)"; do
  said="$(ns client timeout 10 "$dds" get ready --addr "$at" 2>&1 || true)"
  case "$said" in *"requires the cluster's secret"*) ;; *) fail "a client without the secret was not refused by $at: $said" ;; esac
done
echo "netns: a client without the secret is refused by an authority member and a brick"
read -r term0 lead0 <<<"$(leader)"
[ -n "${lead0:-}" ] || fail "no member logged its election" "${member_logs[@]}"
echo "netns: authority members on 10.211.0.1-3 (member $lead0 leads, term $term0), 3 bricks on 10.211.0.4-6, client on 10.211.0.7; loading $keys keys"
for k in $(seq 1 "$keys"); do client put "k$k" "value-$k" >/dev/null || fail "put k$k refused" $(all_logs); done

kill -9 "${brick_pid[1]}"
t0=$(now_ms)
retry 1000 30 0.01 client put after-kill value-0 >/dev/null 2>&1 || fail "no write accepted within 30 s of killing brick 1" $(all_logs)
echo "netns: brick 1 killed; first write accepted after $(( $(now_ms) - t0 )) ms"
bad=$(check_range 1 "$keys" k); [ "$bad" = 0 ] || fail "$bad keys wrong after the kill" $(all_logs)
for k in $(seq 1 200); do client put "d$k" "value-$k" >/dev/null || fail "put d$k refused" $(all_logs); done
start_brick 1
recovered() { grep -q "copied partition(s) now serve reads" "${member_logs[@]}"; }
retry 600 60 0.1 recovered || fail "brick 1 never recovered" "${member_logs[@]}" "$work/b1.log"
echo "netns: brick 1 recovered: $(grep -h 'meta: recovery:' "${member_logs[@]}" | tail -n 1 | sed 's/.*meta: //')"
kill -9 "${brick_pid[0]}"
sleep 0.2
bad=$(( $(check_range 1 "$keys" k) + $(check_range 1 200 d) ))
[ "$bad" = 0 ] || fail "$bad keys wrong after the second kill" $(all_logs)
echo "netns: all $((keys + 200)) keys read back across namespaces after two kills and a recovery"

# The authority's leader dies: SIGKILL the process in its namespace. Writes go on from
# the client's host meanwhile, one process each, for at least 2 s and until a new leader
# is elected: the first accepted one, and the longest stall between accepted ones (the
# bricks fence themselves once no leader has renewed their leases).
read -r term1 lead1 <<<"$(leader)"
[ -n "${lead1:-}" ] || fail "no member logged its election" "${member_logs[@]}"
declare -A brick_from
for i in 0 1 2; do brick_from[$i]=$(( $(stat -c %s "$work/b$i.log") + 1 )); done
kill -9 "${member_pid[$lead1]}"
t0=$(now_ms)
new_leader() { read -r term2 lead2 <<<"$(leader)"; [ "${term2:-0}" -gt "$term1" ]; }
w=0 refused=0 refused_last=0 first=-1 stall=0 last=$t0
while :; do
  at=$(now_ms)
  if [ $(( at - t0 )) -ge 2000 ] && new_leader; then break; fi
  [ $(( at - t0 )) -lt 30000 ] && [ $(( w + refused )) -lt 5000 ] \
    || fail "no new leader elected within 30 s of killing member $lead1" "${member_logs[@]}" $(all_logs)
  if client put "w$(( w + 1 ))" "value-$(( w + 1 ))" >/dev/null 2>&1; then
    w=$(( w + 1 )); at=$(now_ms)
    [ "$first" -ge 0 ] || first=$(( at - t0 ))
    [ $(( at - last )) -le "$stall" ] || stall=$(( at - last ))
    last=$at refused_last=0
  else
    refused=$(( refused + 1 )) refused_last=1; sleep 0.01
  fi
done
# Refused writes at the end count as a stall too.
[ "$refused_last" = 0 ] || [ $(( at - last )) -le "$stall" ] || stall=$(( at - last ))
[ "$first" -ge 0 ] || fail "no write accepted after killing the leader (member $lead1)" $(all_logs)
echo "netns: leader member $lead1 (term $term1, on $(member_addr "$lead1")) killed; first write accepted after $first ms"
echo "netns: $w writes accepted in the $(( last - t0 )) ms after the kill, $refused refused; longest stall between accepted writes $stall ms"
[ "$lead2" != "$lead1" ] || fail "the killed member $lead1 leads term $term2" "${member_logs[@]}"
log_ms() { date -u -d "$(cut -d' ' -f1 <<<"$1")" +%s%3N; }
elected="$(grep -h "member $lead2 elected leader for term $term2\$" "${member_logs[@]}" | tail -n 1)"
echo "netns: member $lead2 elected leader for term $term2, $(( $(log_ms "$elected") - t0 )) ms after the kill (by its log)"
# Bricks 1 and 2 are the live ones (brick 0 was killed above). A brick that fenced itself
# must serve again (its "in touch with the map authority again" line after the fence).
since_kill() { tail -c "+${brick_from[$1]}" "$work/b$1.log"; }
served_again() { since_kill "$1" | sed -n '/fenced, serving nothing/,$p' | grep -q "in touch with the map authority again"; }
for i in 1 2; do
  fenced="$(since_kill "$i" | grep -m 1 "fenced, serving nothing" || true)"
  if [ -z "$fenced" ]; then
    echo "netns: brick $i never fenced itself"
    continue
  fi
  retry 100 10 0.1 served_again "$i" || fail "brick $i fenced itself after the leader's kill and never served again" "$work/b$i.log" "${member_logs[@]}"
  back="$(since_kill "$i" | sed -n '/fenced, serving nothing/,$p' | grep -m 1 "in touch with the map authority again")"
  echo "netns: brick $i fenced itself $(( $(log_ms "$fenced") - t0 )) ms after the kill, served again $(( $(log_ms "$back") - $(log_ms "$fenced") )) ms later"
done
for k in $(seq 1 100); do client put "e$k" "value-$k" >/dev/null || fail "put e$k refused without member $lead1" $(all_logs); done
bad=$(( $(check_range 1 "$keys" k) + $(check_range 1 200 d) + $(check_range 1 "$w" w) + $(check_range 1 100 e) ))
[ "$bad" = 0 ] || fail "$bad keys wrong after the leader's kill" $(all_logs)
total=$(( keys + 300 + w ))
echo "netns: all $total keys read back with member $lead1 dead"

# The killed member comes back in its namespace, same flags and directory, and follows.
from=$(( $(stat -c %s "$work/m$lead1.log") + 1 ))
start_member "$lead1"
follows() {
  read -r term3 lead3 <<<"$(leader)"
  tail -c "+$from" "$work/m$lead1.log" | grep -q "member $lead1 follows member $lead3 in term $term3\$"
}
retry 300 30 0.1 follows || fail "restarted member $lead1 does not follow the leader (member ${lead3:-?}, term ${term3:-?})" "${member_logs[@]}"
echo "netns: member $lead1 restarted; follows member $lead3 in term $term3"
[ "$term3" = "$term2" ] || echo "netns: note: the leadership changed again after the restart (term $term2 -> $term3)"
bad=$(( $(check_range 1 "$keys" k) + $(check_range 1 200 d) + $(check_range 1 "$w" w) + $(check_range 1 100 e) ))
[ "$bad" = 0 ] || fail "$bad keys wrong after the member's restart" $(all_logs)
echo "netns: all $total keys read back after the leader's kill and its restart"

# Membership: member 4 joins through any member, from its own namespace.
ip netns exec "$tag-m4" "$dds" meta --id 4 --join "$(member_addr 1)" --join "$(member_addr 2)" --join "$(member_addr 3)" \
  --dir "$work/m4" --listen "$(member_addr 4)" --bricks 3 --replicas 2 --secret-file "$work/secret" >>"$work/m4.log" 2>&1 &
member_pid[4]=$!
pids+=($!)
disown $!
member_logs+=("$work/m4.log")
joined() { grep -q "member 4 follows member\|member 4 elected leader" "$work/m4.log"; }
retry 300 30 0.1 joined || fail "member 4 did not join the group" "${member_logs[@]}"
# The ids `dds members` lists through member M, on one line.
group_of() { ns client timeout 20 "$dds" members --meta "$(member_addr "$1")" --secret-file "$work/secret" | sed -n 's/^member \([0-9]*\) at .*/\1/p' | tr '\n' ' '; }
echo "netns: member 4 joined from 10.211.0.8; the group is now $(group_of 4)"
# The member killed above leaves, asked through the new one; then its process stops.
ns client timeout 30 "$dds" members --meta "$(member_addr 4)" --remove "$lead1" --secret-file "$work/secret" >/dev/null \
  || fail "member $lead1 could not be removed" "${member_logs[@]}"
kill "${member_pid[$lead1]}"
for m in 1 2 3 4; do
  [ "$m" = "$lead1" ] && continue
  got="$(group_of "$m")"
  want="$(for x in 1 2 3 4; do [ "$x" = "$lead1" ] || printf '%s ' "$x"; done)"
  [ "$got" = "$want" ] || fail "member $m lists the group as '$got', not '$want'" "${member_logs[@]}"
done
echo "netns: member $lead1 removed; every member lists the group as $want"
for k in $(seq 1 50); do client put "f$k" "value-$k" >/dev/null || fail "put f$k refused after the membership changes" $(all_logs); done
bad=$(( $(check_range 1 "$keys" k) + $(check_range 1 200 d) + $(check_range 1 "$w" w) + $(check_range 1 100 e) + $(check_range 1 50 f) ))
[ "$bad" = 0 ] || fail "$bad keys wrong after the membership changes" $(all_logs)
echo "netns: all $(( total + 50 )) keys read back after a member joined and another left"
echo "netns: 1 passed, 0 failed"
