#!/usr/bin/env bash
# Benchmarks `pm-push update` on loopback: N real pm-agent processes (`pm-lab agents`), a dist
# with a big third-party signature file (a `files` feed, SIZE MB of `.hdb` lines) beside ClamAV's
# signed test database, served by `pm-mirror serve`. Three rollouts, each measured for wall time
# and for the body bytes `pm-mirror serve` sent (it prints its totals when it stops):
#   1. initial: every agent is new and fetches the whole dist (N x SIZE MB expected),
#   2. cdiff-sized change: upstream moves test 5 -> 6 (an 817-byte cdiff; test.cvd is 8 KB);
#      the big file is unchanged, so each agent must fetch only what changed,
#   3. re-run: every host is already on dist (skipped, nothing served but nothing asked either).
# The table compares the bytes served with N x the bytes of the files that changed in dist.
# Not run in CI: on the 2-core lab machine with the defaults it needs about 25 GB of disk (the
# agents' databases) and several minutes.
#
# Usage: scripts/bench-rollout.sh        (e.g. PM_BENCH_AGENTS=10 PM_BENCH_SIZE_MB=20 ...)
# Environment:
#   PM_BENCH_AGENTS=100        agents (127.0.0.2 ...)
#   PM_BENCH_SIZE_MB=200       size of the big signature file
#   PM_BENCH_WAVE=50           pm-push --wave-size (after a canary of 1)
#   PM_BENCH_CONCURRENCY=32    pm-push --concurrency
#   PM_BENCH_KEEP=1            keep the work directory (its path is printed)
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
agents="${PM_BENCH_AGENTS:-100}"
size_mb="${PM_BENCH_SIZE_MB:-200}"
wave="${PM_BENCH_WAVE:-50}"
concurrency="${PM_BENCH_CONCURRENCY:-32}"

cargo build --quiet --release --bins
bin="${root}/target/release"

work="$(mktemp -d)"
home="${work}/home"
mkdir -p "${home}" "${work}/feed"
pids=()
serve_pid=""
cleanup() {
  [[ -n "${serve_pid}" ]] && kill "${serve_pid}" 2>/dev/null
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  # pm-lab agents stops its agents on SIGTERM; let it finish before their files go.
  for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
  if [[ -n "${PM_BENCH_KEEP:-}" ]]; then echo "kept ${work}" >&2; else rm -rf "${work}"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for_url() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }
now() { date +%s.%N; }

echo "writing a ${size_mb} MB signature file (md5:size:name lines)" >&2
python3 - "${work}/feed/big.hdb" "${size_mb}" <<'PY'
import hashlib, sys
path, size = sys.argv[1], int(sys.argv[2]) << 20
with open(path, "w") as out:
    n = written = 0
    while written < size:
        line = f"{hashlib.md5(n.to_bytes(8, 'little')).hexdigest()}:{1000 + n % 100000}:Pm.Bench.{n}\n"
        out.write(line)
        written += len(line)
        n += 1
PY

upstream_port="$(free_port)"
"${bin}/pm-lab" upstream --listen "127.0.0.1:${upstream_port}" --version 5 \
  --files-dir "${work}/feed" --files-version 1 2>"${work}/upstream.log" &
pids+=($!)
wait_for_url "http://127.0.0.1:${upstream_port}/clamav/test.cvd"
cat >"${home}/pm.toml" <<TOML
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
mirror() { "${bin}/pm-mirror" --home "${home}" --quiet "$@"; }
mirror sync
mirror publish

serve_port="$(free_port)"
start_serve() {
  "${bin}/pm-mirror" --home "${home}" serve --listen "127.0.0.1:${serve_port}" 2>"${work}/serve-$1.log" &
  serve_pid=$!
  wait_for_url "http://127.0.0.1:${serve_port}/manifest.sig"
}
# Stops serve and prints the body bytes it sent (minus the probe of start_serve).
stop_serve() {
  kill -TERM "${serve_pid}"
  wait "${serve_pid}" || true
  serve_pid=""
  local probe served
  probe="$(stat -c %s "${home}/repo/dist/manifest.sig")"
  served="$(sed -n 's/^served [0-9]* requests, \([0-9]*\) body bytes$/\1/p' "${work}/serve-$1.log")"
  python3 -c "print(int('${served}') - ${probe})"
}

"${bin}/pm-activate" --home "${home}" --quiet key new --reusable --ttl 2h --comment bench --out "${work}/bench.key" >/dev/null
echo "starting ${agents} agents" >&2
"${bin}/pm-lab" agents --count "${agents}" --dir "${work}/agents" --port "$(free_port)" \
  --activation-key-file "${work}/bench.key" >/dev/null 2>"${work}/agents.log" &
pids+=($!)
for _ in $(seq 1 1200); do grep -qs 'agents running' "${work}/agents.log" && break; sleep 0.1; done
grep -qs 'agents running' "${work}/agents.log" || { cat "${work}/agents.log" >&2; echo "pm-lab agents did not start" >&2; exit 1; }
"${bin}/pm-activate" --home "${home}" --quiet host --targets "${work}/agents/targets.txt" \
  --key-file "${work}/bench.key" --dist-url "http://127.0.0.1:${serve_port}" --json >"${work}/activate.json"

# rollout NAME: one measured `pm-push update --all`, with serve started fresh for its totals.
rollout() {
  local name="$1" started status=0
  cp "${home}/repo/dist/manifest.json" "${work}/${name}.manifest.json"
  start_serve "${name}"
  started="$(now)"
  "${bin}/pm-push" --home "${home}" update --all --canary 1 --wave-size "${wave}" \
    --concurrency "${concurrency}" --json >"${work}/${name}.json" || status=$?
  awk -v a="${started}" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }' >"${work}/${name}.wall"
  stop_serve "${name}" >"${work}/${name}.served"
  echo "${status}" >"${work}/${name}.status"
}

echo "rollout 1: the whole dist to new agents" >&2
cp "${home}/repo/dist/manifest.json" "${work}/empty-before.manifest.json"
rollout initial
echo "rollout 2: upstream test 5 -> 6 (a cdiff), sync, publish" >&2
curl -sf -X POST "http://127.0.0.1:${upstream_port}/_lab/version?n=6" >/dev/null
mirror sync
mirror publish
rollout cdiff
echo "rollout 3: the same dist again" >&2
rollout rerun

du_agents="$(du -sh "${work}/agents" | cut -f1)"
python3 - "${work}" "${agents}" "${size_mb}" "${du_agents}" <<'PY'
import json, pathlib, sys
work, agents, size_mb, du_agents = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def files(manifest):
    return {f["path"]: (f["sha256"], f["size"]) for f in json.loads(manifest.read_text())["files"]}

def changed_bytes(before, after):
    """Bytes of the files of `after` the agents did not have: new paths or new content."""
    old = set(before.values()) if before else set()
    return sum(size for sha, size in after.values() if (sha, size) not in old)

rows = []
previous = None
for name, label in [("initial", "initial (new agents)"), ("cdiff", "cdiff-sized change"), ("rerun", "re-run, nothing new")]:
    after = files(work / f"{name}.manifest.json")
    changed = changed_bytes(previous, after)
    previous = after
    doc = json.loads((work / f"{name}.json").read_text() or "{}")
    results = {}
    for host in doc.get("hosts", []):
        results[host.get("result")] = results.get(host.get("result"), 0) + 1
    served = int((work / f"{name}.served").read_text().strip() or 0)
    wall = float((work / f"{name}.wall").read_text())
    status = (work / f"{name}.status").read_text().strip()
    rows.append((label, wall, served, changed, agents * changed, results, status))

print(f"\n{agents} agents, big signature file {size_mb} MB; agents' disk after: {du_agents}\n")
print(f"{'rollout':<24} {'wall s':>7} {'bytes served':>15} {'changed in dist':>16} {'N x changed':>15} {'served/(N x changed)':>21}  results (exit)")
for label, wall, served, changed, n_changed, results, status in rows:
    ratio = f"{served / n_changed:.3f}" if n_changed else "-"
    summary = ", ".join(f"{k} {v}" for k, v in sorted(results.items()))
    print(f"{label:<24} {wall:>7.1f} {served:>15,} {changed:>16,} {n_changed:>15,} {ratio:>21}  {summary} ({status})")
print("\nbytes served: body bytes pm-mirror serve sent (its own count, printed at SIGTERM), the")
print("manifest and its signature included; changed in dist: bytes of the dist files whose content")
print("was not in the previous dist (a new test.cvd, a new cdiff and its .sign count in full).")
PY
