#!/usr/bin/env bash
# Installs what building and testing pm needs on a fresh Debian machine: system packages
# (OpenSSL headers, ClamAV's freshclam/clamscan/sigtool for the end-to-end tests, Prometheus's
# promtool and server for the exporter's and dashboards' tests, groff/man-db, systemd-analyze
# and unshare/setpriv for the install kit's tests, patchelf for the packages, python3-venv for
# Ansible, libfaketime for an agent whose clock steps back), the DuckDB CLI from PyPI, and the
# prebuilt libduckdb. Safe to run again: it skips what is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

apt_packages=(pkg-config libssl-dev openssl curl ca-certificates clamav clamav-freshclam clamav-daemon clamdscan prometheus groff-base man-db systemd util-linux patchelf python3-venv python3-apt sudo faketime)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q "install ok installed" || missing+=("${package}")
done
sudo=""
[[ "$(id -u)" -ne 0 ]] && sudo="sudo"
if (( ${#missing[@]} > 0 )); then
  echo "installing: ${missing[*]}"
  ${sudo} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Only promtool is needed; the Prometheus server the package starts under systemd is not.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  ${sudo} systemctl disable --now prometheus
fi

# The DuckDB CLI users query the inventory with (DESIGN.md section 7), same version as libduckdb.
# Python's duckdb of the same version: the tests run the README's SQL examples with it too
# (it needs pytz to hand out TIMESTAMPTZ values).
for package in duckdb-cli duckdb; do
  if ! python3 -m pip show "${package}" 2>/dev/null | grep -q '^Version: 1.5.6$'; then
    python3 -m pip install --quiet --disable-pip-version-check "${package}==1.5.6"
  fi
done
python3 -m pip show pytz >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check pytz

# Ansible for the playbooks' tests (ansible/test.sh), in its own virtualenv; pinned.
ansible_venv="${root}/.cache/ansible"
if ! "${ansible_venv}/bin/ansible-playbook" --version 2>/dev/null | grep -q 'core 2.19.14'; then
  python3 -m venv "${ansible_venv}"
  "${ansible_venv}/bin/pip" install --quiet --disable-pip-version-check \
    ansible-core==2.19.14 ansible-lint==26.10.1
fi

"${root}/scripts/fetch-libduckdb.sh"
