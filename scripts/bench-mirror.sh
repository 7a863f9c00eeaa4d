#!/usr/bin/env bash
# Benchmarks `pm-mirror sync` over loopback against the lab upstream (DESIGN.md section 8):
#   - a full sync of a large `files` product (default 500 MiB in 5 random files),
#   - a no-change sync, repeated (it must download 0 bytes),
#   - curl fetching the same files from the same server, to /dev/null and to disk + fsync,
# and prints bytes, seconds and MiB/s (1 MiB = 1048576 bytes) for each.
#
# Usage: scripts/bench-mirror.sh            (e.g. PM_BENCH_MB=50 scripts/bench-mirror.sh)
# Environment:
#   PM_BENCH_MB=500        feed size in MiB, split evenly over PM_BENCH_FILES files (50: quick run)
#   PM_BENCH_FILES=5       number of feed files
#   PM_BENCH_REPEAT=3      full syncs and curl runs (interleaved); the table shows the medians
#   PM_BENCH_RUNS=5        no-change syncs
#   PM_BENCH_PROFILE=dev   `dev` (cargo build --bins) or `release` (cargo build --release --bins)
#   PM_BENCH_JSON=PATH     also write a JSON summary to PATH
#   PM_BENCH_KEEP=1        keep the work directory (its path is printed)
#   TMPDIR                 where the work directory goes: put it on the disk to measure (on tmpfs
#                          fsync costs nothing)
# Results are only comparable on an otherwise idle machine: the load average is printed.
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
mib=1048576

total_mb="${PM_BENCH_MB:-500}"
file_count="${PM_BENCH_FILES:-5}"
repeat="${PM_BENCH_REPEAT:-3}"
runs="${PM_BENCH_RUNS:-5}"
profile="${PM_BENCH_PROFILE:-dev}"
json_out="${PM_BENCH_JSON:-}"

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo "bench: $*" >&2; }

for setting in "PM_BENCH_MB=${total_mb}" "PM_BENCH_FILES=${file_count}" \
  "PM_BENCH_REPEAT=${repeat}" "PM_BENCH_RUNS=${runs}"; do
  [[ "${setting#*=}" =~ ^[1-9][0-9]*$ ]] || die "${setting%%=*} must be a positive integer, not \`${setting#*=}\`"
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
for tool in cargo curl python3 head sync; do
  command -v "${tool}" > /dev/null || die "\`${tool}\` is needed"
done
if [[ -n "${json_out}" && "${json_out}" != /* ]]; then
  json_out="${PWD}/${json_out}"
fi

# Loopback only: a proxy from the environment must not get in the way.
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

log "building: ${build[*]}"
(cd "${root}" && "${build[@]}" >&2)
pm_mirror="${bin_dir}/pm-mirror"
pm_lab="${bin_dir}/pm-lab"
[[ -x "${pm_mirror}" && -x "${pm_lab}" ]] || die "no pm-mirror and pm-lab in ${bin_dir} after the build"

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench.XXXXXX")"
pids=()
cleanup() {
  local status=$? pid
  for pid in "${pids[@]}"; do
    kill "${pid}" 2> /dev/null || true
    wait "${pid}" 2> /dev/null || true
  done
  if [[ "${PM_BENCH_KEEP:-}" == 1 ]]; then
    echo "bench: kept ${work}" >&2
  else
    rm -rf "${work}"
    if ((status != 0)); then
      echo "hint: rerun with PM_BENCH_KEEP=1 to keep the work directory and its logs" >&2
    fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

feed="${work}/feed"
mkdir -p "${feed}"

now() { date +%s.%N; }
# Decimal arithmetic: calc EXPRESSION name=value...; prints the result with 3 decimals.
calc() {
  python3 -c '
import sys
names = {k: float(v) for k, v in (arg.split("=", 1) for arg in sys.argv[2:])}
print(f"{eval(sys.argv[1], {}, names):.3f}")' "$@"
}
# Median, minimum and maximum of the arguments.
stats() {
  python3 -c '
import statistics, sys
v = [float(x) for x in sys.argv[1:]]
print(f"{statistics.median(v):.3f} {min(v):.3f} {max(v):.3f}")' "$@"
}
# Flushes everything written so far, so that its writeback does not land in a timed step.
settle() { sync -f "${work}"; }

log "generating ${file_count} x ${per_file_mb} MiB of random data in ${feed}"
for i in $(seq 1 "${file_count}"); do
  head -c "$((per_file_mb * mib))" /dev/urandom > "${feed}/blob-${i}.bin"
done
feed_files=("${feed}"/blob-*.bin)
feed_bytes=$((file_count * per_file_mb * mib))
settle

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
  log "the lab upstream did not start on port ${port} (attempt ${attempt}):"
  sed 's/^/  /' "${work}/lab.log" >&2
  lab_pid=""
done
[[ -n "${lab_pid}" ]] || die "the lab upstream did not start; see its log above"
base="http://127.0.0.1:${port}"
log "lab upstream on ${base}/ (pid ${lab_pid})"

# A fresh manager home with the two products.
new_home() {
  local home="$1"
  rm -rf "${home}"
  mkdir -p "${home}"
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
}

# Runs `pm-mirror --home HOME sync --json` (output in ${work}/sync-LABEL.json, stderr in .log)
# and prints "<wall seconds> <bytes_downloaded> <self-timed seconds> <changed> <vendor files
# downloaded> <CPU seconds>". Fails when pm-mirror does, or when a product did not sync.
run_sync() {
  local home="$1" label="$2"
  local out="${work}/sync-${label}.json" err="${work}/sync-${label}.log"
  python3 - "${out}" "${err}" "${pm_mirror}" --home "${home}" sync --json << 'EOF'
import json, resource, subprocess, sys, time
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "w") as stdout, open(err, "w") as stderr:
    start = time.monotonic()
    status = subprocess.run(argv, stdout=stdout, stderr=stderr).returncode
    wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
if status != 0:
    sys.stderr.write(f"error: pm-mirror sync exited with status {status}:\n")
    for path in (err, out):
        sys.stderr.writelines("  " + line for line in open(path))
    sys.exit(1)
report = json.load(open(out))
bad = [f'{p["name"]} ({p["result"]})' for p in report["products"]
       if p["result"] not in ("updated", "unchanged")]
if bad:
    sys.exit(f"error: products did not sync: {', '.join(bad)} (see {out})")
vendor = sum(p["files_downloaded"] for p in report["products"] if p["name"] == "vendor")
print(f"{wall:.3f}", report["bytes_downloaded"], f'{report["duration_seconds"]:.3f}',
      str(report["changed"]).lower(), vendor, f"{usage.ru_utime + usage.ru_stime:.3f}")
EOF
}

# Fetches every feed file with one curl each, like pm fetches one file after another, to
# /dev/null or into DIR; prints "<bytes> <seconds>" (the sum of curl's time_total).
curl_fetch() {
  local target_dir="$1" file name output result bytes seconds total_bytes=0 total_seconds=0
  for file in "${feed_files[@]}"; do
    name="$(basename "${file}")"
    output=/dev/null
    [[ -n "${target_dir}" ]] && output="${target_dir}/${name}"
    result="$(curl -sf --noproxy '*' -o "${output}" -w '%{size_download} %{time_total}' \
      "${base}/vendor/${name}")" || die "curl could not fetch ${base}/vendor/${name}"
    read -r bytes seconds <<< "${result}"
    total_bytes=$((total_bytes + bytes))
    total_seconds="$(calc 'a + b' a="${total_seconds}" b="${seconds}")"
  done
  echo "${total_bytes} ${total_seconds}"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg 2> /dev/null || echo unknown)"
full_walls=()
full_selfs=()
full_cpus=()
null_seconds=()
disk_seconds=()
disk_transfers=()
disk_fsyncs=()
full_bytes=0
full_files=0
for rep in $(seq 1 "${repeat}"); do
  log "round ${rep}/${repeat}: full sync"
  home="${work}/home-${rep}"
  new_home "${home}"
  rm -rf "${work}/home-$((rep - 1))" "${work}/curl"
  settle
  result="$(run_sync "${home}" "full-${rep}")"
  read -r wall bytes self changed files cpu_seconds <<< "${result}"
  [[ "${changed}" == true ]] || die "full sync ${rep} did not change latest (see ${work}/sync-full-${rep}.json)"
  ((bytes >= feed_bytes)) || die "full sync ${rep} downloaded ${bytes} bytes, fewer than the feed's ${feed_bytes}"
  ((files == file_count)) || die "full sync ${rep} downloaded ${files} vendor files, not ${file_count}"
  full_walls+=("${wall}")
  full_selfs+=("${self}")
  full_cpus+=("${cpu_seconds}")
  full_bytes="${bytes}"
  full_files="${files}"

  log "round ${rep}/${repeat}: curl -> /dev/null"
  result="$(curl_fetch "")"
  read -r bytes seconds <<< "${result}"
  ((bytes == feed_bytes)) || die "curl fetched ${bytes} bytes, the feed has ${feed_bytes}"
  null_seconds+=("${seconds}")

  log "round ${rep}/${repeat}: curl -> disk + fsync"
  mkdir -p "${work}/curl"
  settle
  result="$(curl_fetch "${work}/curl")"
  read -r bytes transfer <<< "${result}"
  ((bytes == feed_bytes)) || die "curl fetched ${bytes} bytes, the feed has ${feed_bytes}"
  start="$(now)"
  sync "${work}/curl"/*
  end="$(now)"
  fsync="$(calc 'b - a' a="${start}" b="${end}")"
  disk_transfers+=("${transfer}")
  disk_fsyncs+=("${fsync}")
  disk_seconds+=("$(calc 'a + b' a="${transfer}" b="${fsync}")")
done
rm -rf "${work}/curl"

log "no-change sync x ${runs}"
nochange_walls=()
nochange_selfs=()
nochange_cpus=()
nochange_bytes=0
for i in $(seq 1 "${runs}"); do
  result="$(run_sync "${home}" "nochange-${i}")"
  read -r wall bytes self changed _ cpu_seconds <<< "${result}"
  if ((bytes != 0)) || [[ "${changed}" != false ]]; then
    die "no-change sync ${i} downloaded ${bytes} bytes (changed: ${changed}); expected 0 bytes and no change (see ${work}/sync-nochange-${i}.json)"
  fi
  nochange_walls+=("${wall}")
  nochange_selfs+=("${self}")
  nochange_cpus+=("${cpu_seconds}")
  nochange_bytes=$((nochange_bytes + bytes))
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg 2> /dev/null || echo unknown)"

read -r full_wall full_wall_min full_wall_max <<< "$(stats "${full_walls[@]}")"
read -r full_self _ _ <<< "$(stats "${full_selfs[@]}")"
read -r full_cpu _ _ <<< "$(stats "${full_cpus[@]}")"
read -r null_secs null_min null_max <<< "$(stats "${null_seconds[@]}")"
read -r disk_secs disk_min disk_max <<< "$(stats "${disk_seconds[@]}")"
read -r disk_transfer _ _ <<< "$(stats "${disk_transfers[@]}")"
read -r disk_fsync _ _ <<< "$(stats "${disk_fsyncs[@]}")"
read -r nc_median nc_min nc_max <<< "$(stats "${nochange_walls[@]}")"
read -r nc_self _ _ <<< "$(stats "${nochange_selfs[@]}")"
read -r nc_cpu _ _ <<< "$(stats "${nochange_cpus[@]}")"

rate() { calc 'b / s / m' b="$1" s="$2" m="${mib}"; }
full_rate="$(rate "${full_bytes}" "${full_wall}")"
full_self_rate="$(rate "${full_bytes}" "${full_self}")"
null_rate="$(rate "${feed_bytes}" "${null_secs}")"
disk_rate="$(rate "${feed_bytes}" "${disk_secs}")"
vs_disk="$(calc '100 * p / c' p="${full_rate}" c="${disk_rate}")"
vs_null="$(calc '100 * p / c' p="${full_rate}" c="${null_rate}")"
marginal="$(calc 'f - n' f="${full_wall}" n="${nc_median}")"
marginal_rate="$(calc 'b / max(s, 0.001) / m' b="${full_bytes}" s="${marginal}" m="${mib}")"
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2> /dev/null | head -n 1)"
fs_type="$(stat -f -c %T "${work}")"

row() { printf '%-38s %12s %9.3f %9s\n' "$@"; }
mibs() { printf '%.1f' "$1"; }
{
  echo "pm-mirror loopback benchmark: ${file_count} x ${per_file_mb} MiB feed, ${profile} profile, median of ${repeat}"
  echo "machine: $(nproc) CPUs (${cpu:-unknown CPU}), kernel $(uname -r), work dir on ${fs_type}"
  echo "load average before ${load_before}, after ${load_after}"
  if python3 -c 'import os, sys; sys.exit(0 if os.getloadavg()[0] > os.cpu_count() / 2 else 1)'; then
    echo "warning: the machine is busy (1-minute load above half the CPUs): expect noisy numbers"
  fi
  echo
  printf '%-38s %12s %9s %9s\n' operation bytes seconds MiB/s
  row "pm-mirror sync, full (wall)" "${full_bytes}" "${full_wall}" "$(mibs "${full_rate}")"
  row "pm-mirror sync, full (self-timed)" "${full_bytes}" "${full_self}" "$(mibs "${full_self_rate}")"
  row "curl -> /dev/null" "${feed_bytes}" "${null_secs}" "$(mibs "${null_rate}")"
  row "curl -> disk + fsync" "${feed_bytes}" "${disk_secs}" "$(mibs "${disk_rate}")"
  row "pm-mirror sync, no change (wall)" "${nochange_bytes}" "${nc_median}" -
  echo
  printf 'full sync: pm-mirror (wall) reaches %.0f%% of curl -> disk + fsync and %.0f%% of curl -> /dev/null\n' \
    "${vs_disk}" "${vs_null}"
  echo "  wall ${full_wall_min}..${full_wall_max}s over ${repeat} runs, ${full_cpu} CPU seconds (user + sys, median); ${full_files} vendor files; bytes include the index and the clamav product"
  printf '  full minus no-change wall: %ss = %.1f MiB/s (the data, without the fixed cost of a run)\n' \
    "${marginal}" "${marginal_rate}"
  echo "curl -> /dev/null ${null_min}..${null_max}s; curl -> disk + fsync ${disk_min}..${disk_max}s (median ${disk_transfer}s transfer + ${disk_fsync}s fsync)"
  echo "no-change sync x ${runs}: wall median ${nc_median}s, min ${nc_min}s, max ${nc_max}s; self-timed median ${nc_self}s; ${nc_cpu} CPU seconds; ${nochange_bytes} bytes downloaded"
  echo "MiB = 1048576 bytes; wall = pm-mirror process start to exit; self-timed = its duration_seconds; curl = sum of time_total"
}

if [[ -n "${json_out}" ]]; then
  join() {
    local IFS=,
    echo "$*"
  }
  python3 - "${json_out}" "${profile}" "$(uname -r)" "${cpu}" "${fs_type}" "${load_before}" \
    "${load_after}" << EOF
import json, sys
summary = {
    "profile": sys.argv[2],
    "machine": {"nproc": $(nproc), "kernel": sys.argv[3], "cpu": sys.argv[4],
                "work_fs": sys.argv[5], "load_before": sys.argv[6], "load_after": sys.argv[7]},
    "unit": "MiB/s (1 MiB = 1048576 bytes)",
    "feed": {"files": ${file_count}, "bytes": ${feed_bytes}},
    "repeat": ${repeat},
    "full_sync": {"bytes": ${full_bytes}, "vendor_files": ${full_files},
                  "wall_seconds": [$(join "${full_walls[@]}")],
                  "self_seconds": [$(join "${full_selfs[@]}")],
                  "cpu_seconds": [$(join "${full_cpus[@]}")],
                  "median_wall_seconds": ${full_wall}, "median_self_seconds": ${full_self},
                  "median_cpu_seconds": ${full_cpu},
                  "mib_per_s": ${full_rate}, "self_mib_per_s": ${full_self_rate},
                  "minus_nochange_seconds": ${marginal},
                  "minus_nochange_mib_per_s": ${marginal_rate}},
    "nochange_sync": {"runs": ${runs}, "bytes": ${nochange_bytes},
                      "wall_seconds": [$(join "${nochange_walls[@]}")],
                      "self_seconds": [$(join "${nochange_selfs[@]}")],
                      "cpu_seconds": [$(join "${nochange_cpus[@]}")],
                      "median_wall_seconds": ${nc_median}, "min_wall_seconds": ${nc_min},
                      "median_self_seconds": ${nc_self}, "median_cpu_seconds": ${nc_cpu}},
    "curl_devnull": {"bytes": ${feed_bytes}, "seconds": [$(join "${null_seconds[@]}")],
                     "median_seconds": ${null_secs}, "mib_per_s": ${null_rate}},
    "curl_disk_fsync": {"bytes": ${feed_bytes}, "seconds": [$(join "${disk_seconds[@]}")],
                        "transfer_seconds": [$(join "${disk_transfers[@]}")],
                        "fsync_seconds": [$(join "${disk_fsyncs[@]}")],
                        "median_seconds": ${disk_secs}, "mib_per_s": ${disk_rate}},
    "pm_vs_curl_percent": {"disk_fsync": ${vs_disk}, "devnull": ${vs_null}},
}
with open(sys.argv[1], "w") as out:
    json.dump(summary, out, indent=2)
    out.write("\n")
EOF
  log "wrote ${json_out}"
fi
