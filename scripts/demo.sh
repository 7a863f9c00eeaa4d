#!/usr/bin/env bash
# The demo: sets up a fresh Debian machine, builds pm, and walks the mirror pipeline on loopback:
# a lab upstream serving ClamAV's signed test databases -> pm-mirror sync -> publish -> serve ->
# a stock freshclam updates from it -> clamscan finds the EICAR test file -> pm-lab agents starts
# three agents on 127.0.0.2-4 that pm-activate enrols in bulk -> agents install and scan ->
# pm-poll records the fleet -> pm-query and the DuckDB CLI show status and history -> pm-exporter
# serves it to Prometheus.
# Everything runs in a temporary directory and stops by itself.
#
# PM_BIN_DIR=/usr/bin runs it on installed tools (the .deb packages) instead of a fresh build;
# pm-lab, the lab tool that is never packaged, then comes from PM_LAB (default target/debug).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
scripts/setup.sh
if [[ -n "${PM_BIN_DIR:-}" ]]; then
  bin="${PM_BIN_DIR}"
  lab="${PM_LAB:-${root}/target/debug/pm-lab}"
  [[ -x "${lab}" ]] || { echo "error: no pm-lab at ${lab}" >&2; echo "hint: cargo build --bin pm-lab, or set PM_LAB" >&2; exit 2; }
  # The lab agents run the installed pm-agent too.
  export PM_AGENT_BIN="${bin}/pm-agent"
else
  cargo build --quiet --bins
  bin="${root}/target/debug"
  lab="${bin}/pm-lab"
fi
echo "tools from ${bin}"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  # pm-lab agents stops its agents on SIGTERM; let it finish before their files go.
  for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
  rm -rf "${work}"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

home="${work}/home"
mkdir -p "${home}" "${work}/feed"
head -c 2000000 /dev/urandom > "${work}/feed/engine-update.bin"

upstream_port="$(free_port)"
"${lab}" upstream --listen "127.0.0.1:${upstream_port}" --version 3 \
  --files-dir "${work}/feed" --files-version 2026.11 2>"${work}/lab.log" &
pids+=($!)
wait_for "http://127.0.0.1:${upstream_port}/clamav/test.cvd"

cat > "${home}/pm.toml" <<TOML
[[products]]
name = "clamav"
kind = "clamav"
url = "http://127.0.0.1:${upstream_port}/clamav"
databases = ["test"]

[[products]]
name = "vendor"
kind = "files"
index_url = "http://127.0.0.1:${upstream_port}/vendor/index.json"
TOML
mirror() { "${bin}/pm-mirror" --home "${home}" "$@"; }

step "upstream offers test.cvd version 3: first sync"
mirror sync
step "publish latest to dist"
mirror publish
step "upstream moves to version 6: sync fetches the new CVD and cdiffs"
curl -sf -X POST "http://127.0.0.1:${upstream_port}/_lab/version?n=6" >/dev/null
mirror sync
step "a second sync with no upstream change downloads nothing"
mirror sync --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print("changed:", r["changed"], "bytes downloaded:", r["bytes_downloaded"])'
step "publish rotates dist into backup/1"
mirror publish
mirror status

serve_port="$(free_port)"
"${bin}/pm-mirror" --home "${home}" serve --listen "127.0.0.1:${serve_port}" 2>"${work}/serve.log" &
pids+=($!)
wait_for "http://127.0.0.1:${serve_port}/manifest.json"

step "a stock freshclam updates test-1 -> test-6 from pm-mirror serve"
mkdir -p "${work}/clamdb"
cp "${PM_CLAMAV_TESTDB:-${root}/../shared/clamav-testdb}/test-1.cvd" "${work}/clamdb/test.cvd"
chmod 644 "${work}/clamdb/test.cvd"
cat > "${work}/freshclam.conf" <<CONF
DatabaseDirectory ${work}/clamdb
DatabaseOwner root
DatabaseMirror http://127.0.0.1:${serve_port}/clamav
ScriptedUpdates yes
ExcludeDatabase daily
ExcludeDatabase main
ExcludeDatabase bytecode
ExtraDatabase test
Foreground yes
CONF
if [[ "$(id -u)" -ne 0 ]]; then sed -i "s/^DatabaseOwner root/DatabaseOwner $(id -un)/" "${work}/freshclam.conf"; fi
freshclam --config-file="${work}/freshclam.conf" --no-dns --stdout --no-warnings
printf '%s' 'X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*' > "${work}/eicar.com"
step "clamscan with the updated database"
clamscan --no-summary -d "${work}/clamdb" "${work}/eicar.com" || true

step "three agents on 127.0.0.2-4 (pm-lab agents), enrolled in bulk with one reusable activation key over mutual TLS"
"${bin}/pm-activate" --home "${home}" key new --reusable --ttl 1h --comment demo --out "${work}/demo.key"
"${lab}" agents --count 3 --dir "${work}/agents" --port "$(free_port)" --host-prefix demo- \
  --activation-key-file "${work}/demo.key" >"${work}/agents.txt" 2>"${work}/agents.log" &
pids+=($!)
# It prints the table, then says on stderr that the agents run (each waited for, at most 10 s).
for _ in $(seq 1 400); do grep -qs 'agents running' "${work}/agents.log" && break; sleep 0.1; done
grep -qs 'agents running' "${work}/agents.log" || { cat "${work}/agents.log" >&2; echo "pm-lab agents did not start" >&2; exit 1; }
cat "${work}/agents.txt"
"${bin}/pm-activate" --home "${home}" host --targets "${work}/agents/targets.txt" --key-file "${work}/demo.key" \
  --group demo --dist-url "http://127.0.0.1:${serve_port}"
"${bin}/pm-activate" --home "${home}" list

step "two agents install dist, one scans a directory holding EICAR; pm-poll records the fleet"
for n in 000 001; do "${bin}/pm-agent" --state "${work}/agents/agent-${n}" update >/dev/null; done
mkdir -p "${work}/scan-me" && cp "${work}/eicar.com" "${work}/scan-me/" && echo clean > "${work}/scan-me/clean.txt"
"${bin}/pm-agent" --state "${work}/agents/agent-000" scan "${work}/scan-me" || true
"${bin}/pm-poll" --home "${home}"
step "a second poll: nothing new, changed: false"
"${bin}/pm-poll" --home "${home}" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print("changed:", r["changed"], r["summary"])'
step "fleet status and scan alerts with pm-query"
"${bin}/pm-query" --home "${home}" \
  "SELECT host, grp, reachable, versions, behind_by, version_colour, scan_colour FROM fleet_status ORDER BY host"
"${bin}/pm-query" --home "${home}" "SELECT host, path, signature, found_at FROM scan_alerts"

step "the inventory, queried with the stock DuckDB CLI (read-only)"
duckdb_cli="${PM_DUCKDB_CLI:-$(command -v duckdb || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/duckdb")}"
"${duckdb_cli}" -readonly "${home}/inventory.duckdb" -c \
  "SELECT product, result, versions, bytes_downloaded, revision, round(duration_seconds, 3) AS seconds FROM mirror_syncs ORDER BY id"
"${duckdb_cli}" -readonly "${home}/inventory.duckdb" -c \
  "SELECT changed_at, action, revision, previous_revision, backups FROM dist_history ORDER BY id"
step "pm-exporter: the same fleet as Prometheus metrics (promtool checks the scrape)"
exporter_port="$(free_port)"
"${bin}/pm-exporter" --home "${home}" --listen "127.0.0.1:${exporter_port}" --allow 127.0.0.0/8 2>"${work}/exporter.log" &
pids+=($!)
wait_for "http://127.0.0.1:${exporter_port}/healthz"
curl -sf "http://127.0.0.1:${exporter_port}/metrics" >"${work}/metrics.txt"
grep -E '^pm_host_(up|scan_findings|version_status)\{' "${work}/metrics.txt"
promtool check metrics <"${work}/metrics.txt" && echo "promtool check metrics: ok"
step "demo done"
