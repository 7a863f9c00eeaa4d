#!/usr/bin/env bash
# Fetches the official prebuilt libduckdb (DESIGN.md section 7) once, checks its sha256 and caches it
# in .cache/libduckdb/, where .cargo/config.toml points DUCKDB_LIB_DIR. Never builds DuckDB from source.
set -euo pipefail

version="1.5.6"
package="@duckdb/node-bindings-linux-x64"
tarball_url="https://registry.npmjs.org/${package}/-/node-bindings-linux-x64-${version}-r.1.tgz"
tarball_sha256="1b9f82478539bb9a1d1df44bd103121a12ae52142c07158dc52b97d2ec1d69ff"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${root}/.cache/libduckdb"
stamp="${dest}/.sha256-${tarball_sha256}"

if [[ -f "${stamp}" && -f "${dest}/libduckdb.so" ]]; then
  echo "libduckdb ${version} already cached in ${dest}"
  exit 0
fi

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "error: the prebuilt libduckdb is only pinned for x86_64 Linux" >&2
  echo "hint: build with \`cargo build --features bundled\` instead (compiles DuckDB, ~40 min)" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
echo "fetching ${package}@${version}-r.1 from the npm registry"
curl --fail --silent --show-error --location --retry 3 -o "${work}/pkg.tgz" "${tarball_url}"
actual="$(sha256sum "${work}/pkg.tgz" | cut -d' ' -f1)"
if [[ "${actual}" != "${tarball_sha256}" ]]; then
  echo "error: sha256 mismatch for ${tarball_url}: expected ${tarball_sha256}, got ${actual}" >&2
  exit 1
fi
tar -xzf "${work}/pkg.tgz" -C "${work}" package/libduckdb.so
mkdir -p "${dest}"
# Stage then rename so a killed download never leaves a half-written library behind.
mv "${work}/package/libduckdb.so" "${dest}/libduckdb.so.tmp"
mv "${dest}/libduckdb.so.tmp" "${dest}/libduckdb.so"
rm -f "${dest}"/.sha256-*
touch "${stamp}"
echo "libduckdb ${version} cached in ${dest}"
