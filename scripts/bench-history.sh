#!/usr/bin/env bash
# Benchmarks inventory growth (`pm-lab history`): fills a fresh inventory with simulated poll
# history (default 10,000 hosts polled every 5 minutes for 90 days: ~259 million `polls` rows),
# checkpoints it, and prints a JSON report: rows per table, generation time, the size of
# inventory.duckdb, and the median time (5 runs after a warm-up, on a read-only connection opened
# like the tools open it) of `fleet_status`, `stale_hosts`, `version_drift`, a 7-day history
# query on `polls`, one host's `version_history` and the newest `scan_alerts`.
# Targets: fleet_status under 200 ms, file under 2 GB. Not part of CI.
#
# Usage: scripts/bench-history.sh          (e.g. PM_BENCH_HOSTS=1000 PM_BENCH_DAYS=7 for a quick run)
# Environment:
#   PM_BENCH_HOSTS=10000     simulated hosts
#   PM_BENCH_DAYS=90         days of history, ending now
#   PM_BENCH_INTERVAL=5m     poll interval (300, 300s, 5m, 1h)
#   PM_BENCH_SEED=42         seed of the simulated data
#   PM_BENCH_JSON=PATH       also write the report to PATH
#   PM_BENCH_KEEP=1          keep the work directory (its path is printed), e.g. to query it with
#                            `duckdb -readonly DIR/home/inventory.duckdb`
#   TMPDIR                   where the work directory goes: the full size needs ~3 GB free
# Needs ~1.5 GB of memory beyond the page cache; takes ~5 minutes on 2 cores at the full size.
set -euo pipefail

if [ "$#" -gt 0 ]; then
  # Settings come from the environment; the only argument is --help.
  [ "$1" = -h ] || [ "$1" = --help ] || { echo "error: unexpected argument \`$1\` (see --help)" >&2; exit 2; }
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  exit 0
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
hosts="${PM_BENCH_HOSTS:-10000}"
days="${PM_BENCH_DAYS:-90}"
interval="${PM_BENCH_INTERVAL:-5m}"
seed="${PM_BENCH_SEED:-42}"

(cd "$root" && cargo build --release --bin pm-lab)

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench-history.XXXXXX")"
if [ "${PM_BENCH_KEEP:-}" = 1 ]; then
  echo "work directory: $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi
echo "free space in $work: $(df -h --output=avail "$work" | tail -1 | tr -d ' ')" >&2
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$root/target/release/pm-lab" history --home "$work/home" --hosts "$hosts" --days "$days" \
  --interval "$interval" --seed "$seed" > "$work/report.json"
cat "$work/report.json"
if [ -n "${PM_BENCH_JSON:-}" ]; then
  cp "$work/report.json" "$PM_BENCH_JSON"
fi
