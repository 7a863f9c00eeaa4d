#!/usr/bin/env bash
# Benchmarks `pm-exporter` on a large inventory: fills a fresh one with simulated hosts and poll
# history (`pm-lab history`, default 10,000 hosts, 2 days every 5 minutes), starts pm-exporter
# on it, and prints a JSON report: how long a snapshot read holds the inventory open, scrape
# latency (p50/p99 over N scrapes with curl, Prometheus text and OpenMetrics), body size, series
# count, and the exporter's peak RSS (VmHWM) after several refreshes.
# Targets from issue 7 on the 2-core lab machine at 10,000 hosts: a scrape under 200 ms, peak RSS
# under 150 MB. Not part of CI.
#
# Usage: scripts/bench-exporter.sh        (e.g. PM_BENCH_HOSTS=1000 for a quick run)
# Environment:
#   PM_BENCH_HOSTS=10000     simulated hosts
#   PM_BENCH_DAYS=2          days of poll history
#   PM_BENCH_SCRAPES=50      scrapes per format
#   PM_BENCH_REFRESH=3s      pm-exporter --refresh (short, so that the scrapes span refreshes)
#   PM_BENCH_PORT=9745       port on 127.0.0.1
#   PM_BENCH_JSON=PATH       also write the report to PATH
#   PM_BENCH_KEEP=1          keep the work directory (its path is printed)
# Results are only comparable on an otherwise idle machine: the load average is printed.
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
hosts="${PM_BENCH_HOSTS:-10000}"
days="${PM_BENCH_DAYS:-2}"
scrapes="${PM_BENCH_SCRAPES:-50}"
refresh="${PM_BENCH_REFRESH:-3s}"
port="${PM_BENCH_PORT:-9745}"
openmetrics='application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5'

(cd "$root" && cargo build --quiet --release --bin pm-lab --bin pm-exporter)
bin="$root/target/release"

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench-exporter.XXXXXX")"
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if [[ "${PM_BENCH_KEEP:-}" = 1 ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

echo "filling an inventory with $hosts hosts and $days days of history" >&2
"$bin/pm-lab" history --home "$work/home" --hosts "$hosts" --days "$days" --interval 5m \
  > "$work/history.json" 2> "$work/history.log"

"$bin/pm-exporter" --home "$work/home" --listen "127.0.0.1:$port" --refresh "$refresh" \
  2> "$work/exporter.log" &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
  if curl -fs -o /dev/null "$base/healthz"; then break; fi
  kill -0 "$pid" 2>/dev/null || { cat "$work/exporter.log" >&2; exit 1; }
  sleep 0.1
done
curl -fs -o /dev/null "$base/healthz" || { echo "error: no snapshot after 30 s" >&2; exit 1; }

# Seconds per scrape, sorted; then p50 and p99 (nearest rank).
measure() {
  local accept="$1" out="$2"
  for _ in $(seq 1 "$scrapes"); do
    curl -fs -H "Accept: $accept" -o "$out" -w '%{time_total}\n' "$base/metrics"
    sleep 0.1
  done | sort -n > "$out.times"
}
rank() {
  local file="$1" percent="$2" n
  n=$(wc -l < "$file")
  sed -n "$(( (n * percent + 99) / 100 ))p" "$file"
}
measure 'text/plain;version=0.0.4' "$work/text.txt"
measure "$openmetrics" "$work/openmetrics.txt"

metric() { awk -v name="$1" '$1 == name { print $2 }' "$work/text.txt"; }
rss_kib=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status")
now_kib=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
report=$(cat <<EOF
{
  "hosts": $hosts,
  "days": $days,
  "inventory_bytes": $(stat -c %s "$work/home/inventory.duckdb"),
  "snapshot_read_seconds": $(metric pm_inventory_snapshot_read_seconds),
  "read_errors": $(metric pm_inventory_read_errors_total),
  "scrapes_per_format": $scrapes,
  "text_p50_seconds": $(rank "$work/text.txt.times" 50),
  "text_p99_seconds": $(rank "$work/text.txt.times" 99),
  "openmetrics_p50_seconds": $(rank "$work/openmetrics.txt.times" 50),
  "openmetrics_p99_seconds": $(rank "$work/openmetrics.txt.times" 99),
  "text_body_bytes": $(stat -c %s "$work/text.txt"),
  "openmetrics_body_bytes": $(stat -c %s "$work/openmetrics.txt"),
  "series": $(grep -vc '^#' "$work/text.txt"),
  "peak_rss_mib": $(( rss_kib / 1024 )),
  "rss_mib_at_end": $(( now_kib / 1024 ))
}
EOF
)
echo "$report"
if [[ -n "${PM_BENCH_JSON:-}" ]]; then echo "$report" > "$PM_BENCH_JSON"; fi
