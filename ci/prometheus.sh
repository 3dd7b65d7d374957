#!/usr/bin/env bash
# A real Prometheus scrapes a 3-brick cluster under load (issue 20): Debian's
# `prometheus` on loopback, scraping every brick and the map authority (`cluster up
# --metrics`) each second; its HTTP API must then show every target up and the series
# of requests, replies, server-side latency, log syncs and the map, with the request
# counters moving between two queries.
#   ci/prometheus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null; then
  echo "ci/prometheus.sh: installing prometheus (Debian)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
cargo build --release --locked -q
dds="$PWD/target/release/dds"
work="$(mktemp -d -t dds-prometheus-XXXXXX)"
prom_pid=""
cleanup() {
  [ -n "$prom_pid" ] && kill "$prom_pid" 2>/dev/null || true
  "$dds" cluster down --dir "$work/c" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$dds" cluster up --dir "$work/c" --bricks 3 --replicas 2 --cores 1 --metrics
"$dds" cluster status --dir "$work/c" | grep "metrics:"
targets="$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
addrs = [m["metrics"] for m in c["metas"]] + [b["metrics"] for b in c["bricks"]]
print(", ".join(repr(a) for a in addrs))' "$work/c/cluster.json")"
ntargets="$(python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); print(len(c["metas"]) + len(c["bricks"]))' "$work/c/cluster.json")"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: dds
    authorization:
      type: Bearer
      credentials_file: $work/c/metrics.token
    static_configs:
      - targets: [$targets]
EOF
# Without the cluster's metrics token a scrape is refused (401); with it, served.
first="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bricks"][0]["metrics"])' "$work/c/cluster.json")"
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$first/metrics")"
[ "$code" = 401 ] || { echo "a scrape without the token got $code, not 401" >&2; exit 1; }
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Bearer $(cat "$work/c/metrics.token")" "http://$first/metrics")"
[ "$code" = 200 ] || { echo "a scrape with the token got $code, not 200" >&2; exit 1; }
echo "metrics: 401 without the cluster's token, 200 with it"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!

# Load for 12 s (bounded), while Prometheus scrapes.
"$dds" bench --cluster "$work/c" --workload mixed --clients 2 --depth 4 --seconds 12 --warmup 0 >"$work/bench.txt" 2>&1 &
bench_pid=$!

query() {
  curl -fsS --max-time 5 "http://127.0.0.1:$port/api/v1/query" --data-urlencode "query=$1" \
    | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(sum(float(x["value"][1]) for x in r), len(r))'
}
# Bounded wait for the first scrapes of every target.
for _ in $(seq 60); do
  up="$(query 'sum(up{job="dds"})' 2>/dev/null || echo "0 0")"
  [ "${up%% *}" = "$ntargets.0" ] && break
  sleep 0.5
done
echo "targets up: $up (of $ntargets: the authority's members and the bricks)"
[ "${up%% *}" = "$ntargets.0" ] || { echo "FAIL: not every target is up"; tail -20 "$work/prometheus.log"; exit 1; }
sleep 3
first="$(query 'sum(dds_requests_total{op=~"get|prepare|commit"})')"
sleep 4
second="$(query 'sum(dds_requests_total{op=~"get|prepare|commit"})')"
echo "requests (sum, series): $first, then $second"
python3 -c 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if b > a > 0 else 1)' "${first%% *}" "${second%% *}" \
  || { echo "FAIL: the request counters did not move"; exit 1; }
for series in dds_replies_total dds_request_seconds_bucket dds_log_sync_seconds_count dds_log_bytes_total dds_log_batch_records_sum \
  dds_map_epoch dds_fenced dds_keys dds_meta_map_epoch dds_meta_bricks dds_meta_partitions_under_replicated \
  dds_meta_raft_term dds_meta_members; do
  got="$(query "$series")"
  echo "$series: sum ${got% *}, ${got#* } series"
  [ "${got#* }" != "0" ] || { echo "FAIL: no $series"; exit 1; }
done
leaders="$(query 'sum(dds_meta_leader)')"
echo "authority leaders (sum over the members): ${leaders%% *}"
[ "${leaders%% *}" = "1.0" ] || { echo "FAIL: the authority group has ${leaders%% *} leaders, not 1"; exit 1; }
# Every query of the Grafana dashboard (hw/grafana-dds.json) is valid PromQL with data.
python3 - "$port" hw/grafana-dds.json <<'PY'
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
for panel in json.load(open(path))["panels"]:
    for target in panel["targets"]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": target["expr"]})
        reply = json.load(urllib.request.urlopen(url, timeout=5))
        if reply.get("status") != "success":
            sys.exit(f"FAIL: dashboard panel {panel['title']!r}: {reply}")
        print(f"dashboard: {panel['title']}: {len(reply['data']['result'])} series")
PY
p99="$(query 'histogram_quantile(0.99, sum by (le) (rate(dds_request_seconds_bucket{op="prepare"}[5s])))')"
echo "prepare p99 over the last 5 s, server side: ${p99%% *} s"
wait "$bench_pid"
echo "ci/prometheus.sh: Prometheus scraped every brick and the authority; the series exist and move"
