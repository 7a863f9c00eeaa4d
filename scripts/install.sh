#!/usr/bin/env bash
# Installs pm: the manager tools and pm-agent to PREFIX/bin, the prebuilt libduckdb they load to
# PREFIX/lib/pm (their rpath rewritten to it with patchelf, so they do not need the build tree),
# their bash/zsh/fish completions and man pages (generated from the binaries' own command lines
# by `pm-lab generate`), and the
# systemd units with the binary path rewritten to PREFIX/bin, the `pm` user (sysusers.d) and
# /var/lib/pm (tmpfiles.d).
#
#   scripts/install.sh [--prefix /usr/local] [--root DESTDIR] [--bin-dir DIR]
#
# Without --bin-dir it builds release binaries first (cargo build --release --locked); with it,
# it takes prebuilt ones from DIR (pm-lab included: it writes the completions and man pages).
# --root stages everything under DESTDIR (for packaging); the installed files still name PREFIX.
# Running it again overwrites the same files. It starts and enables nothing.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '7p' "$0" | sed 's/^#  *//' >&2; }
die() { echo "error: $1" >&2; [[ $# -gt 1 ]] && echo "hint: $2" >&2; exit 2; }

prefix=/usr/local
destdir=""
bin_dir=""
while (( $# > 0 )); do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
    --root) [[ $# -ge 2 ]] || die "--root needs a directory"; destdir="$2"; shift 2 ;;
    --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a directory"; bin_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown argument \`$1\`" ;;
  esac
done
[[ "${prefix}" == /* ]] || die "--prefix must be absolute, not \`${prefix}\`"
prefix="${prefix%/}"
[[ -z "${destdir}" || "${destdir}" == /* ]] || destdir="$(pwd)/${destdir}"
destdir="${destdir%/}"

# The tools installed; pm-lab is the lab and development tool and stays in the build tree.
tools=(pm-mirror pm-activate pm-agent pm-poll pm-push pm-rollback pm-query pm-exporter pm-doctor)

if [[ -z "${bin_dir}" ]]; then
  (cd "${root_dir}" && cargo build --release --locked --bins)
  bin_dir="${root_dir}/target/release"
fi
libduckdb="${DUCKDB_LIB_DIR:-${root_dir}/.cache/libduckdb}/libduckdb.so"
[[ -d "${bin_dir}" ]] || die "--bin-dir \`${bin_dir}\` is not a directory"
for tool in "${tools[@]}" pm-lab; do
  [[ -x "${bin_dir}/${tool}" ]] || die "\`${bin_dir}/${tool}\` is missing or not executable" \
    "build it with \`cargo build --release\`, or give --bin-dir the directory that holds it"
done

staging="$(mktemp -d)"
trap 'rm -rf "${staging}"' EXIT
"${bin_dir}/pm-lab" generate --out "${staging}" 2>/dev/null \
  || die "\`${bin_dir}/pm-lab generate\` failed" "run it by hand to see why"

target="${destdir}${prefix}"
install -d "${target}/bin" "${target}/lib/pm" "${target}/share/bash-completion/completions" \
  "${target}/share/zsh/site-functions" "${target}/share/fish/vendor_completions.d" \
  "${target}/share/man/man1" "${target}/lib/systemd/system" "${target}/lib/sysusers.d" \
  "${target}/lib/tmpfiles.d"
for tool in "${tools[@]}"; do
  install -s -m 0755 "${bin_dir}/${tool}" "${target}/bin/${tool}"
  # Built against the prebuilt libduckdb (not `--features bundled`): load the copy beside it.
  if readelf -d "${target}/bin/${tool}" | grep -q 'NEEDED.*\[libduckdb\.so\]'; then
    [[ -f "${libduckdb}" ]] || die "\`${tool}\` needs libduckdb.so and \`${libduckdb}\` is missing" \
      "run scripts/fetch-libduckdb.sh (or set DUCKDB_LIB_DIR to the directory that holds it)"
    install -m 0644 "${libduckdb}" "${target}/lib/pm/libduckdb.so"
    patchelf --set-rpath '$ORIGIN/../lib/pm' "${target}/bin/${tool}"
  else
    # No path into the build tree in an installed binary (pm-agent, bundled builds).
    patchelf --remove-rpath "${target}/bin/${tool}"
  fi
  install -m 0644 "${staging}/completions/bash/${tool}" "${target}/share/bash-completion/completions/${tool}"
  install -m 0644 "${staging}/completions/zsh/_${tool}" "${target}/share/zsh/site-functions/_${tool}"
  install -m 0644 "${staging}/completions/fish/${tool}.fish" "${target}/share/fish/vendor_completions.d/${tool}.fish"
  # The tool's page and one per subcommand (pm-push.1, pm-push-update.1, ...).
  for page in "${staging}/man/man1/${tool}.1" "${staging}/man/man1/${tool}-"*.1; do
    [[ -e "${page}" ]] && install -m 0644 "${page}" "${target}/share/man/man1/"
  done
done
for unit in "${root_dir}"/packaging/systemd/*.service "${root_dir}"/packaging/systemd/*.timer; do
  sed "s#/usr/local/bin#${prefix}/bin#g" "${unit}" > "${staging}/unit"
  install -m 0644 "${staging}/unit" "${target}/lib/systemd/system/$(basename "${unit}")"
done
install -m 0644 "${root_dir}/packaging/systemd/pm.sysusers.conf" "${target}/lib/sysusers.d/pm.conf"
install -m 0644 "${root_dir}/packaging/systemd/pm.tmpfiles.conf" "${target}/lib/tmpfiles.d/pm.conf"

echo "installed pm to ${target}"
if [[ -z "${destdir}" ]]; then
  echo "next: systemd-sysusers pm.conf; systemd-tmpfiles --create pm.conf; systemctl daemon-reload"
fi
