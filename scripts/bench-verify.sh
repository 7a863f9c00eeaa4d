#!/usr/bin/env bash
# Benchmarks the repository check of pm-doctor and `pm-mirror repair` (docs/repairing.md) on a
# repository of about 1 GiB: a `files` product of random (incompressible, like CVDs) files plus
# ClamAV's test databases, synced and published twice over loopback from the lab upstream, one
# file changed in between, so that dist and backup/1 share all but one file by hard link.
# Times, warm page cache (median of PM_BENCH_REPEAT runs):
#   - `pm-doctor` (dist verified, then every generation's files: a shared inode hashed once),
#   - `pm-mirror --dry-run repair` (the survey of every generation alone),
#   - `sha256sum` over the distinct content, the floor any full check stands on;
# and once each with a cold page cache when /proc/sys/vm/drop_caches is writable (root, no
# container restriction). Prints bytes, seconds and MiB/s (1 MiB = 1048576 bytes).
#
# Usage: scripts/bench-verify.sh            (e.g. PM_BENCH_MB=100 scripts/bench-verify.sh)
# Environment:
#   PM_BENCH_MB=1024       feed size in MiB, split evenly over PM_BENCH_FILES files
#   PM_BENCH_FILES=32      number of feed files
#   PM_BENCH_REPEAT=3      timed runs per step; the table shows the medians
#   PM_BENCH_PROFILE=dev   `dev` (cargo build --bins) or `release` (cargo build --release --bins)
#   PM_BENCH_KEEP=1        keep the work directory (its path is printed)
#   TMPDIR                 where the work directory goes: put it on the disk to measure
# Results are only comparable on an otherwise idle machine: the load average is printed.
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
mib=1048576
total_mb="${PM_BENCH_MB:-1024}"
file_count="${PM_BENCH_FILES:-32}"
repeat="${PM_BENCH_REPEAT:-3}"
profile="${PM_BENCH_PROFILE:-dev}"

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo "bench: $*" >&2; }

for setting in "PM_BENCH_MB=${total_mb}" "PM_BENCH_FILES=${file_count}" "PM_BENCH_REPEAT=${repeat}"; do
  [[ "${setting#*=}" =~ ^[1-9][0-9]*$ ]] || die "${setting%%=*} must be a positive integer, not \`${setting#*=}\`"
done
per_file_mb=$((total_mb / file_count))
((per_file_mb >= 1)) || die "PM_BENCH_MB=${total_mb} is less than 1 MiB per file (PM_BENCH_FILES=${file_count})"
case "${profile}" in
  dev | debug) build=(cargo build --bins) bin_dir="${root}/target/debug" ;;
  release) build=(cargo build --release --bins) bin_dir="${root}/target/release" ;;
  *) die "PM_BENCH_PROFILE must be \`dev\` or \`release\`, not \`${profile}\`" ;;
esac
for tool in cargo curl python3 head sha256sum; do
  command -v "${tool}" > /dev/null || die "\`${tool}\` is needed"
done

unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

log "building: ${build[*]}"
(cd "${root}" && "${build[@]}" >&2)
pm_mirror="${bin_dir}/pm-mirror"
pm_doctor="${bin_dir}/pm-doctor"
pm_lab="${bin_dir}/pm-lab"

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench-verify.XXXXXX")"
lab_pid=""
cleanup() {
  local status=$?
  if [[ -n "${lab_pid}" ]]; then
    kill "${lab_pid}" 2> /dev/null || true
    wait "${lab_pid}" 2> /dev/null || true
  fi
  if [[ "${PM_BENCH_KEEP:-}" == 1 ]]; then
    echo "bench: kept ${work}" >&2
  else
    rm -rf "${work}"
    ((status == 0)) || echo "hint: rerun with PM_BENCH_KEEP=1 to keep the work directory and its logs" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

feed="${work}/feed"
home="${work}/home"
mkdir -p "${feed}" "${home}"
log "generating ${file_count} x ${per_file_mb} MiB of random data in ${feed}"
for i in $(seq 1 "${file_count}"); do
  head -c "$((per_file_mb * mib))" /dev/urandom > "${feed}/blob-${i}.bin"
done

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
"${pm_lab}" upstream --listen "127.0.0.1:${port}" --files-dir "${feed}" --version 6 \
  > "${work}/lab.log" 2>&1 &
lab_pid=$!
base="http://127.0.0.1:${port}"
for _ in $(seq 1 600); do
  curl -sf --noproxy '*' -o /dev/null "${base}/vendor/index.json" && break
  kill -0 "${lab_pid}" 2> /dev/null || die "the lab upstream did not start: $(cat "${work}/lab.log")"
  sleep 0.1
done
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

mirror() { "${pm_mirror}" --home "${home}" "$@" > "${work}/mirror.log" 2>&1 || die "pm-mirror $* failed: $(cat "${work}/mirror.log")"; }
log "syncing and publishing ${total_mb} MiB, then again with one file changed"
mirror sync
mirror publish
head -c "$((per_file_mb * mib))" /dev/urandom > "${feed}/blob-1.bin"
kill "${lab_pid}" && wait "${lab_pid}" 2> /dev/null || true
"${pm_lab}" upstream --listen "127.0.0.1:${port}" --files-dir "${feed}" --files-version 2 --version 6 \
  > "${work}/lab.log" 2>&1 &
lab_pid=$!
for _ in $(seq 1 600); do
  curl -sf --noproxy '*' -o /dev/null "${base}/vendor/index.json" && break
  sleep 0.1
done
mirror sync
mirror publish
sync -f "${home}"
distinct_bytes="$(find "${home}/repo/revisions" -type f -printf '%i %s\n' | sort -u | awk '{s += $2} END {printf "%d", s}')"

# Runs "$@" and prints its wall seconds; the exit status must be 0.
timed() {
  python3 - "$@" << 'EOF'
import subprocess, sys, time
start = time.monotonic()
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.monotonic() - start
if status.returncode != 0:
    sys.exit(f"error: {' '.join(sys.argv[1:])} exited with {status.returncode}: {status.stderr.decode()}")
print(f"{wall:.3f}")
EOF
}
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }
rate() { python3 -c 'import sys; print(f"{float(sys.argv[1]) / 1048576 / float(sys.argv[2]):.0f}")' "$1" "$2"; }
drop_caches() { sync && echo 3 > /proc/sys/vm/drop_caches 2> /dev/null; }

doctor=("${pm_doctor}" --home "${home}")
survey=("${pm_mirror}" --home "${home}" --dry-run repair)
# One path per distinct inode: what a full check must read at least once.
find "${home}/repo/revisions" -type f -printf '%i %p\n' | sort -u -k1,1 | cut -d' ' -f2- > "${work}/distinct.txt"
baseline=(xargs -d '\n' -a "${work}/distinct.txt" sha256sum)
printf '%-36s %10s %10s %8s\n' step bytes seconds MiB/s
for step in doctor survey baseline; do
  declare -n command="${step}"
  "${command[@]}" > /dev/null 2>&1 || true
  times=()
  for _ in $(seq 1 "${repeat}"); do
    times+=("$(timed "${command[@]}")")
  done
  seconds="$(median "${times[@]}")"
  printf '%-36s %10s %10s %8s\n' "${step} (warm)" "${distinct_bytes}" "${seconds}" "$(rate "${distinct_bytes}" "${seconds}")"
  if drop_caches; then
    seconds="$(timed "${command[@]}")"
    printf '%-36s %10s %10s %8s\n' "${step} (cold)" "${distinct_bytes}" "${seconds}" "$(rate "${distinct_bytes}" "${seconds}")"
  fi
  unset -n command
done
drop_caches || log "cold-cache runs skipped: /proc/sys/vm/drop_caches is not writable here"
log "profile ${profile}, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
