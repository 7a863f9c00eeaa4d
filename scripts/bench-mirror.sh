#!/usr/bin/env bash
# Benchmarks `pm-mirror sync` over loopback against the lab upstream (DESIGN.md section 8):
#   - a full sync of a large `files` product (default 500 MiB in 5 random files),
#   - a no-change sync, repeated (it must download 0 bytes),
#   - curl fetching the same files from the same server, to /dev/null and to disk + fsync,
# and prints bytes, seconds and MiB/s (1 MiB = 1048576 bytes) for each.
#
# Usage: scripts/bench-mirror.sh
# Environment:
#   PM_BENCH_MB=500        feed size in MiB, split over PM_BENCH_FILES files (50 for a quick run)
#   PM_BENCH_FILES=5       number of feed files
#   PM_BENCH_RUNS=5        repetitions of the no-change sync
#   PM_BENCH_PROFILE=dev   `dev` (cargo build --bins) or `release` (cargo build --release --bins)
#   PM_BENCH_JSON=PATH     also write a JSON summary to PATH
#   PM_BENCH_KEEP=1        keep the work directory (its path is printed)
#   TMPDIR                 where the work directory goes: put it on the disk you want to measure
#                          (on tmpfs the fsyncs cost nothing)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mib=1048576

total_mb="${PM_BENCH_MB:-500}"
file_count="${PM_BENCH_FILES:-5}"
runs="${PM_BENCH_RUNS:-5}"
profile="${PM_BENCH_PROFILE:-dev}"
json_out="${PM_BENCH_JSON:-}"

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo "bench: $*" >&2; }

for pair in "PM_BENCH_MB:${total_mb}" "PM_BENCH_FILES:${file_count}" "PM_BENCH_RUNS:${runs}"; do
  value="${pair#*:}"
  [[ "${value}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, not \`${value}\`"
done
per_file_mb=$((total_mb / file_count))
((per_file_mb >= 1)) || die "PM_BENCH_MB=${total_mb} is less than 1 MiB per file (PM_BENCH_FILES=${file_count})"

case "${profile}" in
  dev | debug)
    profile="dev"
    build=(cargo build --bins)
    bin_dir="${root}/target/debug"
    ;;
  release)
    build=(cargo build --release --bins)
    bin_dir="${root}/target/release"
    ;;
  *) die "PM_BENCH_PROFILE must be \`dev\` or \`release\`, not \`${profile}\`" ;;
esac
for tool in curl python3 head; do
  command -v "${tool}" > /dev/null || die "\`${tool}\` is needed"
done
if [[ -n "${json_out}" && "${json_out}" != /* ]]; then
  json_out="${PWD}/${json_out}"
fi

# Loopback only: a proxy from the environment must not get in the way.
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

log "building (${build[*]})"
(cd "${root}" && "${build[@]}" >&2)
pm_mirror="${bin_dir}/pm-mirror"
pm_lab="${bin_dir}/pm-lab"
[[ -x "${pm_mirror}" && -x "${pm_lab}" ]] || die "no pm-mirror/pm-lab in ${bin_dir} after the build"

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench.XXXXXX")"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "${pid}" 2> /dev/null || true
    wait "${pid}" 2> /dev/null || true
  done
  if [[ "${PM_BENCH_KEEP:-}" == 1 ]]; then
    echo "bench: kept ${work}" >&2
  else
    rm -rf "${work}"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

feed="${work}/feed"
home="${work}/home"
curl_dir="${work}/curl"
mkdir -p "${feed}" "${home}" "${curl_dir}"

now() { date +%s.%N; }
# Arithmetic on decimals: calc 'EXPRESSION' with a, b, ... given as name=value arguments.
calc() {
  local expr="$1"
  shift
  python3 - "${expr}" "$@" << 'EOF'
import sys
names = dict(arg.split("=", 1) for arg in sys.argv[2:])
value = eval(sys.argv[1], {}, {k: float(v) for k, v in names.items()})
print(f"{value:.3f}")
EOF
}

log "generating ${file_count} x ${per_file_mb} MiB of random data in ${feed}"
for i in $(seq 1 "${file_count}"); do
  head -c "$((per_file_mb * mib))" /dev/urandom > "${feed}/blob-${i}.bin"
done
feed_files=("${feed}"/blob-*.bin)
feed_bytes=$((file_count * per_file_mb * mib))

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Start the lab upstream; retry on another port if the one picked was taken in the meantime.
lab_pid=""
port=""
for attempt in 1 2 3 4 5; do
  port="$(free_port)"
  "${pm_lab}" upstream --listen "127.0.0.1:${port}" --files-dir "${feed}" --version 6 \
    > "${work}/lab.log" 2>&1 &
  lab_pid=$!
  pids+=("${lab_pid}")
  ready=""
  for _ in $(seq 1 600); do
    if curl -sf --noproxy '*' -o /dev/null "http://127.0.0.1:${port}/vendor/index.json"; then
      ready=1
      break
    fi
    kill -0 "${lab_pid}" 2> /dev/null || break
    sleep 0.1
  done
  [[ -n "${ready}" ]] && break
  kill "${lab_pid}" 2> /dev/null || true
  wait "${lab_pid}" 2> /dev/null || true
  log "lab upstream did not start on port ${port} (attempt ${attempt}):"
  sed 's/^/  /' "${work}/lab.log" >&2
  lab_pid=""
done
[[ -n "${lab_pid}" ]] || die "the lab upstream did not start; see the log above"
base="http://127.0.0.1:${port}"
log "lab upstream on ${base}/ (pid ${lab_pid})"

cat > "${home}/pm.toml" << EOF
[[products]]
name = "vendor"
kind = "files"
index_url = "${base}/vendor/index.json"

[[products]]
name = "clamav"
kind = "clamav"
url = "${base}/clamav"
databases = ["test"]
EOF

# Runs `pm-mirror sync --json`; prints "<wall seconds> <bytes_downloaded> <duration_seconds>
# <changed> <files downloaded>". stderr goes to ${work}/sync-<label>.log.
run_sync() {
  local label="$1" out="${work}/sync-$1.json" err="${work}/sync-$1.log" start end status=0
  start="$(now)"
  "${pm_mirror}" --home "${home}" sync --json > "${out}" 2> "${err}" || status=$?
  end="$(now)"
  if ((status != 0)); then
    echo "error: pm-mirror sync (${label}) exited with ${status}" >&2
    sed 's/^/  /' "${err}" "${out}" >&2
    return 1
  fi
  python3 - "${out}" "$(calc 'b - a' a="${start}" b="${end}")" << 'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
files = sum(p.get("files_downloaded", 0) for p in report["products"])
failed = [p["name"] for p in report["products"] if p["result"] in ("failed", "cooldown")]
if failed:
    sys.exit(f"error: products did not sync: {', '.join(failed)}")
print(sys.argv[2], report["bytes_downloaded"], f'{report["duration_seconds"]:.3f}',
      str(report["changed"]).lower(), files)
EOF
}

log "full sync (${feed_bytes} bytes in the feed)"
result="$(run_sync full)"
read -r full_wall full_bytes full_self full_changed full_files <<< "${result}"
[[ "${full_changed}" == true ]] || die "the full sync did not change latest"
((full_bytes >= feed_bytes)) || die "the full sync downloaded ${full_bytes} bytes, less than the feed's ${feed_bytes}"

log "no-change sync x ${runs}"
nochange_walls=()
nochange_selfs=()
nochange_bytes=0
for i in $(seq 1 "${runs}"); do
  result="$(run_sync "nochange-${i}")"
  read -r wall bytes self changed _ <<< "${result}"
  if ((bytes != 0)) || [[ "${changed}" != false ]]; then
    die "no-change sync ${i} downloaded ${bytes} bytes (changed: ${changed}); expected 0 and no change (see ${work}/sync-nochange-${i}.json)"
  fi
  nochange_walls+=("${wall}")
  nochange_selfs+=("${self}")
  nochange_bytes=$((nochange_bytes + bytes))
done
stats() {
  python3 -c 'import statistics, sys; v = [float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.3f} {min(v):.3f} {max(v):.3f}")' "$@"
}
read -r nc_median nc_min nc_max <<< "$(stats "${nochange_walls[@]}")"
read -r nc_self_median _ _ <<< "$(stats "${nochange_selfs[@]}")"

# curl: one process per file, like pm fetches one file after another.
curl_fetch() {
  local target_dir="$1" file name bytes seconds result total_bytes=0 total_seconds=0
  for file in "${feed_files[@]}"; do
    name="$(basename "${file}")"
    local output=/dev/null
    [[ -n "${target_dir}" ]] && output="${target_dir}/${name}"
    result="$(curl -sf --noproxy '*' -o "${output}" \
      -w '%{size_download} %{time_total}' "${base}/vendor/${name}")" \
      || die "curl could not fetch ${base}/vendor/${name}"
    read -r bytes seconds <<< "${result}"
    total_bytes=$((total_bytes + bytes))
    total_seconds="$(calc 'a + b' a="${total_seconds}" b="${seconds}")"
  done
  echo "${total_bytes} ${total_seconds}"
}

log "curl -> /dev/null"
result="$(curl_fetch "")"
read -r curl_null_bytes curl_null_seconds <<< "${result}"
log "curl -> disk + fsync"
result="$(curl_fetch "${curl_dir}")"
read -r curl_disk_bytes curl_disk_transfer <<< "${result}"
fsync_start="$(now)"
sync "${curl_dir}"/*.bin
fsync_end="$(now)"
curl_fsync="$(calc 'b - a' a="${fsync_start}" b="${fsync_end}")"
curl_disk_seconds="$(calc 'a + b' a="${curl_disk_transfer}" b="${curl_fsync}")"
((curl_null_bytes == feed_bytes && curl_disk_bytes == feed_bytes)) \
  || die "curl fetched ${curl_null_bytes}/${curl_disk_bytes} bytes, the feed has ${feed_bytes}"

rate() { calc 'b / s / m' b="$1" s="$2" m="${mib}"; }
full_rate="$(rate "${full_bytes}" "${full_wall}")"
full_self_rate="$(rate "${full_bytes}" "${full_self}")"
curl_null_rate="$(rate "${curl_null_bytes}" "${curl_null_seconds}")"
curl_disk_rate="$(rate "${curl_disk_bytes}" "${curl_disk_seconds}")"
vs_disk="$(calc '100 * p / c' p="${full_rate}" c="${curl_disk_rate}")"
vs_null="$(calc '100 * p / c' p="${full_rate}" c="${curl_null_rate}")"
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2> /dev/null | head -n 1)"
fs_type="$(stat -f -c %T "${work}")"

{
  echo "pm-mirror loopback benchmark: ${file_count} x ${per_file_mb} MiB feed, profile ${profile}"
  echo "machine: $(nproc) CPUs (${cpu:-unknown CPU}), kernel $(uname -r), work dir on ${fs_type} (${work})"
  echo
  printf '%-36s %12s %9s %9s\n' operation bytes seconds MiB/s
  printf '%-36s %12s %9s %9s\n' "pm-mirror sync, full (wall)" "${full_bytes}" "${full_wall}" "${full_rate}"
  printf '%-36s %12s %9s %9s\n' "pm-mirror sync, full (self-timed)" "${full_bytes}" "${full_self}" "${full_self_rate}"
  printf '%-36s %12s %9s %9s\n' "curl -> /dev/null" "${curl_null_bytes}" "${curl_null_seconds}" "${curl_null_rate}"
  printf '%-36s %12s %9s %9s\n' "curl -> disk + fsync" "${curl_disk_bytes}" "${curl_disk_seconds}" "${curl_disk_rate}"
  printf '%-36s %12s %9s %9s\n' "pm-mirror sync, no change (median)" 0 "${nc_median}" -
  echo
  echo "full sync: ${full_files} files; pm-mirror reaches ${vs_disk}% of curl -> disk + fsync, ${vs_null}% of curl -> /dev/null"
  echo "no-change sync x ${runs}: wall median ${nc_median}s, min ${nc_min}s, max ${nc_max}s (self-timed median ${nc_self_median}s), ${nochange_bytes} bytes downloaded"
  echo "curl -> disk: ${curl_disk_transfer}s transfer + ${curl_fsync}s fsync; MiB = 1048576 bytes; wall = process start to exit"
}

if [[ -n "${json_out}" ]]; then
  python3 - "${json_out}" "${profile}" "$(uname -r)" "${cpu}" "${fs_type}" << EOF
import json, sys
summary = {
    "profile": sys.argv[2],
    "machine": {"nproc": $(nproc), "kernel": sys.argv[3], "cpu": sys.argv[4], "work_fs": sys.argv[5]},
    "unit": "MiB/s (1 MiB = 1048576 bytes)",
    "feed": {"files": ${file_count}, "bytes": ${feed_bytes}},
    "full_sync": {"bytes": ${full_bytes}, "files": ${full_files}, "wall_seconds": ${full_wall},
                  "self_seconds": ${full_self}, "mib_per_s": ${full_rate},
                  "self_mib_per_s": ${full_self_rate}},
    "nochange_sync": {"runs": ${runs}, "bytes": ${nochange_bytes},
                      "wall_seconds": [$(IFS=,; echo "${nochange_walls[*]}")],
                      "self_seconds": [$(IFS=,; echo "${nochange_selfs[*]}")],
                      "median_seconds": ${nc_median}, "min_seconds": ${nc_min}},
    "curl_devnull": {"bytes": ${curl_null_bytes}, "seconds": ${curl_null_seconds},
                     "mib_per_s": ${curl_null_rate}},
    "curl_disk_fsync": {"bytes": ${curl_disk_bytes}, "seconds": ${curl_disk_seconds},
                        "transfer_seconds": ${curl_disk_transfer}, "fsync_seconds": ${curl_fsync},
                        "mib_per_s": ${curl_disk_rate}},
    "pm_vs_curl_percent": {"disk_fsync": ${vs_disk}, "devnull": ${vs_null}},
}
with open(sys.argv[1], "w") as out:
    json.dump(summary, out, indent=2)
    out.write("\n")
EOF
  log "wrote ${json_out}"
fi
