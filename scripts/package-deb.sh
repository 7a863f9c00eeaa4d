#!/usr/bin/env bash
# Builds the Debian packages: pm-manager (the manager tools, the libduckdb they load, their
# units, timers, the `pm` user, the dashboards and alert rules, the Ansible roles) and pm-agent
# (the agent and its units; no DuckDB). The files are what scripts/install.sh installs with
# --prefix /usr, so both stay the same; dpkg-deb builds the archives.
#
#   scripts/package-deb.sh [--bin-dir DIR] [--out DIR] [--version VERSION] [--fast]
#
# Without --bin-dir it builds release binaries first; --out defaults to target/debian;
# --version to Cargo.toml's; --fast compresses with gzip -1 instead of xz (for tests). Prints
# the paths of the two packages.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '7p' "$0" | sed 's/^#  *//' >&2; }
die() { echo "error: $1" >&2; [[ $# -gt 1 ]] && echo "hint: $2" >&2; exit 2; }

bin_args=()
compression=(-Zxz -z6)
out="${root_dir}/target/debian"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${root_dir}/Cargo.toml" | head -1)"
while (( $# > 0 )); do
  case "$1" in
    --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a directory"; bin_args=(--bin-dir "$2"); shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift 2 ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a version"; version="$2"; shift 2 ;;
    --fast) compression=(-Zgzip -z1); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown argument \`$1\`" ;;
  esac
done
[[ "${version}" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] \
  || die "\`${version}\` is not a Debian version" "use digits, letters and . + ~ -, e.g. 0.1.0"
for tool in dpkg-deb patchelf readelf; do
  command -v "${tool}" >/dev/null || die "\`${tool}\` is not installed" "run scripts/setup.sh"
done
arch="$(dpkg --print-architecture)"
mkdir -p "${out}"
out="$(cd "${out}" && pwd)"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
"${root_dir}/scripts/install.sh" --prefix /usr --root "${work}/all" "${bin_args[@]}" >/dev/null

# Moves PATH (relative to the staged tree, globs allowed) into package PACKAGE's tree.
take() {
  local package="$1" pattern="$2" file
  for file in ${work}/all/${pattern}; do
    [[ -e "${file}" ]] || continue
    local relative="${file#"${work}/all/"}"
    mkdir -p "${work}/${package}/$(dirname "${relative}")"
    mv "${file}" "${work}/${package}/${relative}"
  done
}
take pm-agent "usr/bin/pm-agent"
take pm-agent "usr/share/bash-completion/completions/pm-agent"
take pm-agent "usr/share/zsh/site-functions/_pm-agent"
take pm-agent "usr/share/fish/vendor_completions.d/pm-agent.fish"
take pm-agent "usr/share/man/man1/pm-agent.1"
take pm-agent "usr/share/man/man1/pm-agent-*.1"
take pm-agent "usr/lib/systemd/system/pm-agent.service"
take pm-agent "usr/lib/systemd/system/pm-agent@.service"
mv "${work}/all" "${work}/pm-manager"

# dpkg owns /usr/bin/pm-agent: a packaged agent is upgraded with the package manager, and its
# unit must not be able to write /usr/bin (`pm-push upgrade-agent` is for tarball installs).
sed -i 's#^ReadWritePaths=/var/lib/pm-agent /var/lib/clamav /usr/bin$#ReadWritePaths=/var/lib/pm-agent /var/lib/clamav#' \
  "${work}/pm-agent/usr/lib/systemd/system/pm-agent.service"
grep -q '^ReadWritePaths=/var/lib/pm-agent /var/lib/clamav$' "${work}/pm-agent/usr/lib/systemd/system/pm-agent.service" \
  || die "pm-agent.service's ReadWritePaths line changed: update scripts/package-deb.sh"

# The manager's extras: dashboards and alert rules to provision, the Ansible roles and playbooks.
# Only files the repository tracks: an operator's inventory or carried bundles in ansible/ must
# never end up in a package; nor the test driver.
mkdir -p "${work}/pm-manager/usr/share/pm"
if git -C "${root_dir}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "${root_dir}" ls-files -z dashboards ansible | grep -zv '^ansible/test\.sh$' \
    | (cd "${root_dir}" && xargs -0 cp --parents -t "${work}/pm-manager/usr/share/pm")
else
  tar -C "${root_dir}" --exclude='ansible/test.sh' --exclude='ansible/inventory.yml' \
    --exclude='ansible/airgap' --exclude='__pycache__' -cf - dashboards ansible \
    | tar -C "${work}/pm-manager/usr/share/pm" -xf -
fi

for package in pm-manager pm-agent; do
  tree="${work}/${package}"
  # Debian policy: compressed man pages, a copyright file and the README in the doc directory.
  find "${tree}/usr/share/man" -name '*.1' -exec gzip -9n {} +
  install -d "${tree}/usr/share/doc/${package}"
  install -m 0644 "${root_dir}/README.md" "${tree}/usr/share/doc/${package}/README.md"
  printf 'pm\nCopyright: the pm developers\nLicense: Apache-2.0\n See /usr/share/common-licenses/Apache-2.0\n' \
    > "${tree}/usr/share/doc/${package}/copyright"
  install -d "${tree}/DEBIAN"
done

# Libraries the binaries load (objdump -T: GLIBC_2.34 at most); libduckdb, shipped inside
# pm-manager, adds libstdc++ (GLIBCXX_3.4.22).
# (Debian 13 and Ubuntu 24.04 name OpenSSL's library package libssl3t64.)
depends="libc6 (>= 2.34), libgcc-s1, libssl3 (>= 3.0.0) | libssl3t64"
installed_size() { du -sk --exclude=DEBIAN "$1" | cut -f1; }

# control PACKAGE EXTRA_DEPENDS SUMMARY DESCRIPTION: the package's DEBIAN/control.
control() {
  local package="$1"
  cat > "${work}/${package}/DEBIAN/control" <<CONTROL
Package: ${package}
Version: ${version}
Architecture: ${arch}
Maintainer: pm developers <pm@localhost>
Installed-Size: $(installed_size "${work}/${package}")
Depends: ${depends}$2
Recommends: clamav
Section: admin
Priority: optional
Description: $3
$(fold -s -w 94 <<<"$4" | sed 's/ *$//; s/^/ /')
CONTROL
}
control pm-manager ", libstdc++6 (>= 6), systemd" "pm manager: mirror, publish, roll out and watch signature databases" \
  "pm-mirror (mirror vendor updates, air-gap bundles, publish with rollback generations, serve a \
private mirror), pm-activate, pm-push, pm-poll, pm-rollback, pm-query, pm-exporter and pm-doctor, \
sharing one embedded DuckDB inventory (libduckdb in /usr/lib/pm). Units for the mirror sync and \
poll timers, pm-mirror serve and pm-exporter; the pm user owns /var/lib/pm."
control pm-agent "" "pm agent: installs signature databases pushed by the pm manager" \
  "The daemon on every scanning host: enrolled by pm-activate over mutual TLS, it installs the \
manager's signed dist revision into the engine's database directory, scans on request or on its \
own schedule and reports its status to pm-poll."

# Maintainer scripts: the user and directory of the manager units, and systemd's view of the
# units. A first install enables and starts nothing (pm.toml must be written first); an upgrade
# restarts what runs (try-restart: only running units), so no old binary keeps serving; removal
# stops and disables the units. Nothing is deleted, not even on purge: /var/lib/pm and
# /var/lib/pm-agent hold the repository, keys and inventory.
# maintainer_scripts PACKAGE "UNITS" [CONFIGURE]: postinst (running CONFIGURE first), prerm and
# postrm of the package. UNITS may hold systemctl patterns (quoted in the scripts).
maintainer_scripts() {
  local package="$1" units="$2" configure="${3:-:}"
  local quoted
  # Split UNITS on spaces without expanding its patterns here.
  local -
  set -f
  quoted="$(printf "'%s' " ${units})"
  cat > "${work}/${package}/DEBIAN/postinst" <<SCRIPT
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
  ${configure}
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  # An upgrade (configure with the old version in \$2): restart what runs on the new binary.
  if [ "\$1" = configure ] && [ -n "\$2" ]; then systemctl try-restart ${quoted}|| true; fi
fi
SCRIPT
  cat > "${work}/${package}/DEBIAN/prerm" <<SCRIPT
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop ${quoted}|| true
fi
SCRIPT
  cat > "${work}/${package}/DEBIAN/postrm" <<SCRIPT
#!/bin/sh
set -e
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
  # The units are gone: their enablement links must not point at nothing.
  for link in /etc/systemd/system/*.wants/pm-agent.service /etc/systemd/system/*.wants/pm-agent@*.service \\
      /etc/systemd/system/*.wants/pm-mirror-serve.service /etc/systemd/system/*.wants/pm-exporter.service \\
      /etc/systemd/system/*.wants/pm-mirror-sync.timer /etc/systemd/system/*.wants/pm-poll.timer; do
    case "\$(basename "\$link")" in
      ${units// /|}) rm -f "\$link" ;;
    esac
  done
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
SCRIPT
  chmod 0755 "${work}/${package}/DEBIAN/postinst" "${work}/${package}/DEBIAN/prerm" "${work}/${package}/DEBIAN/postrm"
}
maintainer_scripts pm-manager "pm-mirror-sync.timer pm-poll.timer pm-mirror-serve.service pm-exporter.service" \
  "systemd-sysusers pm.conf; systemd-tmpfiles --create pm.conf"
maintainer_scripts pm-agent "pm-agent.service pm-agent@*.service"
for package in pm-manager pm-agent; do
  deb="${out}/${package}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group "${compression[@]}" --build "${work}/${package}" "${deb}" >/dev/null
  echo "${deb}"
done
