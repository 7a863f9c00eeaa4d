#!/usr/bin/env bash
# The demo: sets up a fresh Debian machine, builds pm, and walks the mirror pipeline on loopback:
# a lab upstream serving ClamAV's signed test databases -> pm-mirror sync -> publish -> serve ->
# a stock freshclam updates from it -> clamscan finds the EICAR test file -> the DuckDB CLI
# shows the history. Everything runs in a temporary directory and stops by itself.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
scripts/setup.sh
cargo build --quiet --bins
bin="${root}/target/debug"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
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
"${bin}/pm-lab" upstream --listen "127.0.0.1:${upstream_port}" --version 3 \
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

step "enrol three agents (127.0.0.2-4) with one reusable activation key over mutual TLS"
"${bin}/pm-activate" --home "${home}" key new --reusable --ttl 1h --comment demo --out "${work}/demo.key"
for n in 2 3 4; do
  agent_port="$(free_port)"
  state="${work}/agent-${n}"
  "${bin}/pm-agent" --state "${state}" init --listen "127.0.0.${n}:${agent_port}" --engine clamav \
    --database-dir "${work}/agent-${n}-db" --host-name "demo-${n}" --activation-key-file "${work}/demo.key" >/dev/null
  "${bin}/pm-agent" --state "${state}" run 2>"${work}/agent-${n}.log" &
  pids+=($!)
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.${n}/${agent_port}") 2>/dev/null && break; sleep 0.1; done
  "${bin}/pm-activate" --home "${home}" host "127.0.0.${n}:${agent_port}" --key-file "${work}/demo.key" \
    --group demo --dist-url "http://127.0.0.1:${serve_port}"
done
"${bin}/pm-activate" --home "${home}" list

step "the inventory, queried with the stock DuckDB CLI (read-only)"
duckdb_cli="${PM_DUCKDB_CLI:-$(command -v duckdb || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/duckdb")}"
"${duckdb_cli}" -readonly "${home}/inventory.duckdb" -c \
  "SELECT product, result, versions, bytes_downloaded, revision, round(duration_seconds, 3) AS seconds FROM mirror_syncs ORDER BY id"
"${duckdb_cli}" -readonly "${home}/inventory.duckdb" -c \
  "SELECT changed_at, action, revision, previous_revision, backups FROM dist_history ORDER BY id"
step "demo done"
