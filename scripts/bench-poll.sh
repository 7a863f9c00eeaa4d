#!/usr/bin/env bash
# Benchmarks `pm-poll` against a simulated fleet on loopback (`pm-lab fleet`: N agents in one
# process, each on its own 127.x address with its own certificate from the manager CA):
#   - a baseline: bare TLS handshakes with the manager's client certificate to every agent at the
#     same concurrency (`pm-lab handshakes`), the physical limit of this machine,
#   - a first poll (every host new: versions, scans and reachability recorded),
#   - a second poll (nothing changed),
# and prints wall time, user+sys CPU, peak RSS of the measured process, pm-poll's own network
# and inventory-write (lock) seconds, ok/unreachable counts, and the CPU the fleet spent.
# Not run in CI. Targets on the 2-core lab machine at 10,000 hosts: poll + record < 10 s,
# inventory write < 1 s, pm-poll peak RSS < 300 MB.
#
# Usage: scripts/bench-poll.sh           (e.g. PM_BENCH_HOSTS=1000 scripts/bench-poll.sh)
# Environment:
#   PM_BENCH_HOSTS=10000        simulated agents (each needs an open file in the fleet process)
#   PM_BENCH_CONCURRENCY=256    pm-poll --concurrency and the handshake baseline's concurrency
#   PM_BENCH_FIRST=127.1.0.1    address of the first agent (inside 127.0.0.0/8)
#   PM_BENCH_PORT=7600          port of every agent
#   PM_BENCH_KEEP=1             keep the work directory (its path is printed)
# Results are only comparable on an otherwise idle machine: the load average is printed.
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
hosts="${PM_BENCH_HOSTS:-10000}"
concurrency="${PM_BENCH_CONCURRENCY:-256}"
first="${PM_BENCH_FIRST:-127.1.0.1}"
port="${PM_BENCH_PORT:-7600}"

if [[ ! -x /usr/bin/time ]]; then
  echo "installing GNU time (/usr/bin/time -v measures peak RSS)" >&2
  apt-get install -y -qq time >/dev/null
fi
# 10,000 listeners plus the connections of a poll need more than the usual 1024 open files.
ulimit -n "$(ulimit -Hn)"

cargo build --quiet --release --bins
bin="${root}/target/release"

work="$(mktemp -d)"
home="${work}/home"
mkdir -p "${home}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
  if [[ -n "${PM_BENCH_KEEP:-}" ]]; then echo "kept ${work}" >&2; else rm -rf "${work}"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for_url() { for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }
# CPU seconds (user + sys) a process has used so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# A published dist, so fleet_status compares the agents' versions with something.
upstream_port="$(free_port)"
"${bin}/pm-lab" upstream --listen "127.0.0.1:${upstream_port}" --version 6 2>"${work}/upstream.log" &
pids+=($!)
wait_for_url "http://127.0.0.1:${upstream_port}/clamav/test.cvd"
cat >"${home}/pm.toml" <<TOML
[[products]]
name = "clamav"
kind = "clamav"
url = "http://127.0.0.1:${upstream_port}/clamav"
databases = ["test"]
TOML
"${bin}/pm-mirror" --home "${home}" --quiet sync
"${bin}/pm-mirror" --home "${home}" --quiet publish

echo "starting ${hosts} simulated agents from ${first} port ${port}" >&2
fleet_started="$(date +%s.%N)"
"${bin}/pm-lab" fleet --home "${home}" --count "${hosts}" --first-address "${first}" \
  --port "${port}" 2>"${work}/fleet.log" &
fleet_pid=$!
pids+=("${fleet_pid}")
for _ in $(seq 1 1200); do
  grep -q '^ready:' "${work}/fleet.log" && break
  kill -0 "${fleet_pid}" 2>/dev/null || { cat "${work}/fleet.log" >&2; exit 1; }
  sleep 0.25
done
grep '^ready:' "${work}/fleet.log" >&2 || { echo "the fleet did not get ready" >&2; exit 1; }
fleet_ready="$(awk -v a="${fleet_started}" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"

# measure NAME OUT COMMAND...: runs COMMAND under /usr/bin/time -v, stdout to OUT; records the
# fleet's CPU seconds during the run in NAME.fleet_cpu.
measure() {
  local name="$1" out="$2"
  shift 2
  local before after
  before="$(cpu_of "${fleet_pid}")"
  local status=0
  /usr/bin/time -v -o "${work}/${name}.time" "$@" >"${out}" 2>"${work}/${name}.log" || status=$?
  after="$(cpu_of "${fleet_pid}")"
  awk -v a="${before}" -v b="${after}" 'BEGIN { printf "%.2f", b - a }' >"${work}/${name}.fleet_cpu"
  echo "${status}" >"${work}/${name}.status"
}

measure handshakes "${work}/handshakes.json" \
  "${bin}/pm-lab" handshakes --home "${home}" --concurrency "${concurrency}" --json
measure poll1 "${work}/poll1.json" \
  "${bin}/pm-poll" --home "${home}" --json --concurrency "${concurrency}"
measure poll2 "${work}/poll2.json" \
  "${bin}/pm-poll" --home "${home}" --json --concurrency "${concurrency}"

python3 - "${work}" "${hosts}" "${concurrency}" "${fleet_ready}" <<'PY'
import json, pathlib, sys
work, hosts, concurrency, fleet_ready = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def gnu_time(name):
    fields = {}
    for line in (work / f"{name}.time").read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    clock = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    wall = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock)))
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    rss = int(fields["Maximum resident set size (kbytes)"]) / 1024
    return wall, cpu, rss

rows = []
for name, label in [("handshakes", "TLS handshakes (baseline)"), ("poll1", "pm-poll, first"), ("poll2", "pm-poll, unchanged")]:
    wall, cpu, rss = gnu_time(name)
    fleet_cpu = (work / f"{name}.fleet_cpu").read_text()
    status = (work / f"{name}.status").read_text().strip()
    doc = json.loads((work / f"{name}.json").read_text() or "{}")
    if name == "handshakes":
        network, write, ok, bad = "-", "-", doc.get("ok", "?"), doc.get("failed", "?")
    else:
        s = doc.get("summary", {})
        network = f"{s.get('network_seconds', 0):.2f}"
        write = f"{s.get('inventory_write_seconds', 0):.3f}"
        ok, bad = s.get("ok", "?"), s.get("unreachable", "?")
    rows.append([label, f"{wall:.2f}", f"{cpu:.2f}", f"{rss:.0f}", network, write, str(ok), str(bad), fleet_cpu, status])

header = ["run", "wall s", "cpu s", "max RSS MB", "network s", "inventory write s", "ok", "unreachable", "fleet cpu s", "exit"]
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
print(f"{hosts} hosts, concurrency {concurrency}; fleet enrolled and listening in {fleet_ready} s")
for row in [header] + rows:
    print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
