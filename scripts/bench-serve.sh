#!/usr/bin/env bash
# Benchmarks `pm-mirror serve` against nginx (Debian's package) serving the same dist directory
# in the same run, with wrk (Debian's package) as the load generator, over loopback:
#   - probe:     `Range: bytes=0-511` of clamav/test.cvd, what freshclam and `pm-mirror sync` send
#                first, on 64 keep-alive connections, and on one (a request's latency shows there);
#                and of the large file (as freshclam probes daily.cvd and main.cvd)
#   - small:     the whole test.cvd (about 10 KB) on 64 connections
#   - large:     one PM_BENCH_MB MiB file of a `files` feed, on PM_BENCH_LARGE_CONNECTIONS
# each run PM_BENCH_ROUNDS times, serve and nginx alternating, and prints the median requests/s
# and MiB/s and serve's share of nginx's for each. Targets: serve answers at
# least half of nginx's requests/s for probes and small files, and moves at least 80% of its
# MiB/s for the large file. Then it shows what each server answers where they differ
# (Last-Modified of a CVD, a directory, a missing file).
#
# Usage: scripts/bench-serve.sh                (e.g. PM_BENCH_SECONDS=5 PM_BENCH_MB=50 for a quick run)
# Environment:
#   PM_BENCH_MB=200                  size of the large file in MiB
#   PM_BENCH_SECONDS=10              duration of each wrk run
#   PM_BENCH_ROUNDS=3                runs of each case and server (the table shows medians)
#   PM_BENCH_CONNECTIONS=64          connections for probes and small files
#   PM_BENCH_LARGE_CONNECTIONS=4     connections for the large file
#   PM_BENCH_THREADS=2               wrk threads
#   PM_BENCH_PROFILE=release         `release` or `dev` (cargo build --bins)
#   PM_BENCH_KEEP=1                  keep the work directory (its path is printed)
# It installs nginx and wrk with apt-get when they are missing (needs root; the nginx service is
# not started: the benchmark runs its own nginx on a loopback port). Both servers and wrk share
# this machine's CPUs: numbers are only comparable within one run, on an otherwise idle machine
# (the load average is printed). Not part of the test run.
set -euo pipefail

. "$(dirname "$0")/bench-args.sh" "$0" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
mib=1048576
large_mb="${PM_BENCH_MB:-200}"
seconds="${PM_BENCH_SECONDS:-10}"
rounds="${PM_BENCH_ROUNDS:-3}"
connections="${PM_BENCH_CONNECTIONS:-64}"
large_connections="${PM_BENCH_LARGE_CONNECTIONS:-4}"
threads="${PM_BENCH_THREADS:-2}"
profile="${PM_BENCH_PROFILE:-release}"

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo "bench: $*" >&2; }

for setting in "PM_BENCH_MB=${large_mb}" "PM_BENCH_SECONDS=${seconds}" "PM_BENCH_ROUNDS=${rounds}" \
  "PM_BENCH_CONNECTIONS=${connections}" "PM_BENCH_LARGE_CONNECTIONS=${large_connections}" \
  "PM_BENCH_THREADS=${threads}"; do
  [[ "${setting#*=}" =~ ^[1-9][0-9]*$ ]] || die "${setting%%=*} must be a positive integer, not \`${setting#*=}\`"
done
case "${profile}" in
  dev | debug)
    build=(cargo build --bins)
    bin_dir="${root}/target/debug"
    ;;
  release)
    build=(cargo build --release --bin pm-mirror --bin pm-lab)
    bin_dir="${root}/target/release"
    ;;
  *) die "PM_BENCH_PROFILE must be \`release\` or \`dev\`, not \`${profile}\`" ;;
esac

# nginx and wrk from Debian. Installing nginx must not start its service: a policy-rc.d that
# says "no" is in place for the install only (unless the system already has one).
missing=()
command -v wrk > /dev/null || missing+=(wrk)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx)
if ((${#missing[@]})); then
  ((EUID == 0)) || die "${missing[*]} missing; install them (apt-get install ${missing[*]}) or run this as root"
  log "installing ${missing[*]} from Debian"
  policy=/usr/sbin/policy-rc.d
  own_policy=""
  if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "${policy}"
    chmod 755 "${policy}"
    own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || { [[ -n "${own_policy}" ]] && rm -f "${policy}"; die "apt-get install ${missing[*]} failed"; }
  [[ -n "${own_policy}" ]] && rm -f "${policy}"
fi
for tool in cargo curl python3 wrk; do
  command -v "${tool}" > /dev/null || die "\`${tool}\` is needed"
done

unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

log "building: ${build[*]}"
(cd "${root}" && "${build[@]}" >&2)
pm_mirror="${bin_dir}/pm-mirror"
pm_lab="${bin_dir}/pm-lab"
[[ -x "${pm_mirror}" && -x "${pm_lab}" ]] || die "no pm-mirror and pm-lab in ${bin_dir} after the build"

work="$(mktemp -d "${TMPDIR:-/tmp}/pm-bench-serve.XXXXXX")"
chmod 755 "${work}"
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
    ((status == 0)) || echo "hint: rerun with PM_BENCH_KEEP=1 to keep the work directory and its logs" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
# Waits until URL answers (any status), or fails naming LOG.
wait_for() {
  local url="$1" log_file="$2" pid="$3"
  for _ in $(seq 1 300); do
    curl -s --noproxy '*' -o /dev/null "${url}" && return 0
    kill -0 "${pid}" 2> /dev/null || break
    sleep 0.1
  done
  sed 's/^/  /' "${log_file}" >&2
  die "${url} did not answer"
}

log "a dist with ClamAV's test.cvd (version 6) and a ${large_mb} MiB file"
feed="${work}/feed"
mkdir -p "${feed}"
head -c "$((large_mb * mib))" /dev/urandom > "${feed}/large.bin"
lab_port="$(free_port)"
"${pm_lab}" upstream --listen "127.0.0.1:${lab_port}" --files-dir "${feed}" --version 6 \
  > "${work}/lab.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:${lab_port}/vendor/index.json" "${work}/lab.log" "${pids[-1]}"
home="${work}/home"
mkdir -p "${home}"
cat > "${home}/pm.toml" << EOF
[[products]]
name = "clamav"
kind = "clamav"
url = "http://127.0.0.1:${lab_port}/clamav"
databases = ["test"]

[[products]]
name = "vendor"
kind = "files"
index_url = "http://127.0.0.1:${lab_port}/vendor/index.json"
EOF
"${pm_mirror}" --home "${home}" -q sync
"${pm_mirror}" --home "${home}" -q publish
rm -f "${feed}/large.bin"

serve_port="$(free_port)"
"${pm_mirror}" --home "${home}" serve --listen "127.0.0.1:${serve_port}" > "${work}/serve.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:${serve_port}/manifest.json" "${work}/serve.log" "${pids[-1]}"

# nginx as Debian configures it (sendfile, tcp_nopush, tcp_nodelay, keep-alive), serving the
# same directory the way it must to follow publishes: `root` is the `repo/dist` link (serve too
# resolves the view's links on every request); no access log (serve logs requests only at
# -vv), unlimited keep-alive requests (serve has no limit either).
nginx_port="$(free_port)"
mkdir -p "${work}/nginx"
cat > "${work}/nginx/nginx.conf" << EOF
user root root;
worker_processes auto;
pid ${work}/nginx/nginx.pid;
error_log ${work}/nginx/error.log;
events { worker_connections 1024; }
http {
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    access_log off;
    server {
        listen 127.0.0.1:${nginx_port};
        root ${home}/repo/dist;
    }
}
EOF
/usr/sbin/nginx -p "${work}/nginx" -c "${work}/nginx/nginx.conf" -g 'daemon off;' \
  > "${work}/nginx/stdout.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:${nginx_port}/manifest.json" "${work}/nginx/error.log" "${pids[-1]}"

for server in "${serve_port}" "${nginx_port}"; do
  curl -sf --noproxy '*' -o /dev/null "http://127.0.0.1:${server}/vendor/large.bin" \
    || die "port ${server} does not serve vendor/large.bin"
done

# Runs wrk; prints "<requests/s> <MiB/s>". Fails on errors or non-2xx answers.
bench() {
  local url="$1" conns="$2" label="$3"
  shift 3
  local out="${work}/wrk-${label}.txt"
  wrk -t "$((threads < conns ? threads : conns))" -c "${conns}" -d "${seconds}s" --timeout 60s "$@" "${url}" > "${out}" 2>&1 \
    || { cat "${out}" >&2; die "wrk failed on ${url}"; }
  python3 - "${out}" << 'EOF'
import re, sys
text = open(sys.argv[1]).read()
if "Non-2xx or 3xx responses" in text or re.search(r"Socket errors: .*(read|write|timeout) [1-9]", text):
    sys.exit(f"error: wrk saw errors:\n{text}")
requests = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
value, unit = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", text).groups()
scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}[unit]
print(f"{requests:.1f} {float(value) * scale / 1024**2:.2f}")
EOF
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
cases=(
  "probe|/clamav/test.cvd|${connections}|-H|Range: bytes=0-511"
  "probe-1conn|/clamav/test.cvd|1|-H|Range: bytes=0-511"
  "probe-large|/vendor/large.bin|${connections}|-H|Range: bytes=0-511"
  "small|/clamav/test.cvd|${connections}"
  "large|/vendor/large.bin|${large_connections}"
)
declare -A result
for round in $(seq 1 "${rounds}"); do
  for entry in "${cases[@]}"; do
    IFS='|' read -r label path conns extra <<< "${entry}"
    args=()
    [[ -n "${extra}" ]] && args=(-H "${entry##*|}")
    for server in serve nginx; do
      port="${serve_port}"
      [[ "${server}" == nginx ]] && port="${nginx_port}"
      log "round ${round}/${rounds}, ${label}: ${server} (${conns} connections, ${seconds}s)"
      result["${label}-${server}"]+="$(bench "http://127.0.0.1:${port}${path}" "${conns}" "${label}-${server}-${round}" "${args[@]}");"
    done
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

headers() { curl -s --noproxy '*' -o /dev/null -D - "$@" | tr -d '\r'; }
status_of() { curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "$1"; }
modified() { headers "$1" | sed -n 's/^[Ll]ast-[Mm]odified: //p'; }

python3 - "${large_mb}" "${seconds}" "${connections}" "${large_connections}" "${profile}" \
  "${load_before}" "${load_after}" \
  "${result[probe-serve]}" "${result[probe-nginx]}" \
  "${result[probe-1conn-serve]}" "${result[probe-1conn-nginx]}" \
  "${result[probe-large-serve]}" "${result[probe-large-nginx]}" \
  "${result[small-serve]}" "${result[small-nginx]}" \
  "${result[large-serve]}" "${result[large-nginx]}" << 'EOF'
import os, statistics, sys
(large_mb, seconds, conns, large_conns, profile, load_before, load_after), rest = sys.argv[1:8], sys.argv[8:]
def medians(runs):
    runs = [run.split() for run in runs.split(";") if run]
    return [statistics.median(float(run[i]) for run in runs) for i in range(2)], len(runs)
pairs = [(medians(rest[i])[0], medians(rest[i + 1])[0]) for i in range(0, len(rest), 2)]
rounds = medians(rest[0])[1]
cases = [
    (f"probe, Range 0-511 of test.cvd, {conns} conns", "req/s", 0, 0.5),
    ("probe, Range 0-511 of test.cvd, 1 conn", "req/s", 0, None),
    (f"probe, Range 0-511 of the large file, {conns} conns", "req/s", 0, 0.5),
    (f"small, test.cvd (10 KB), {conns} conns", "req/s", 0, 0.5),
    (f"large, {large_mb} MiB file, {large_conns} conns", "MiB/s", 1, 0.8),
]
print(f"pm-mirror serve vs nginx: wrk {seconds}s per run, median of {rounds} rounds, {profile} build, {os.cpu_count()} CPUs shared by wrk and both servers")
print(f"load average before {load_before}, after {load_after}")
print()
print(f"{'case':<52} {'unit':>6} {'serve':>12} {'nginx':>12} {'serve/nginx':>12} {'target':>8}")
for (label, unit, index, target), (serve, nginx) in zip(cases, pairs):
    s, n = serve[index], nginx[index]
    ratio = s / n if n else float("nan")
    verdict = "" if target is None else (f">= {target:.0%} " + ("met" if ratio >= target else "MISSED"))
    print(f"{label:<52} {unit:>6} {s:>12.1f} {n:>12.1f} {ratio:>12.2f} {verdict:>8}")
EOF

echo
echo "where they differ:"
serve_url="http://127.0.0.1:${serve_port}"
nginx_url="http://127.0.0.1:${nginx_port}"
printf '  Last-Modified of clamav/test.cvd: serve %s (the CVD build time freshclam compares), nginx %s (the file'"'"'s mtime)\n' \
  "$(modified "${serve_url}/clamav/test.cvd")" "$(modified "${nginx_url}/clamav/test.cvd")"
printf '  GET /clamav/ (a directory): serve %s, nginx %s (freshclam takes 403 as a ban)\n' \
  "$(status_of "${serve_url}/clamav/")" "$(status_of "${nginx_url}/clamav/")"
printf '  GET /clamav/missing.cdiff: serve %s, nginx %s\n' \
  "$(status_of "${serve_url}/clamav/missing.cdiff")" "$(status_of "${nginx_url}/clamav/missing.cdiff")"
