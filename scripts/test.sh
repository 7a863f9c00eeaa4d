#!/usr/bin/env bash
# Sets up a fresh Debian machine (scripts/setup.sh) and runs the whole test suite: unit tests and
# the integration tests against the lab upstream, real freshclam/clamscan and the DuckDB CLI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
scripts/setup.sh

# pip may put the duckdb CLI outside PATH (e.g. ~/.local/bin); tell the tests where it is.
if [[ -z "${PM_DUCKDB_CLI:-}" ]] && ! command -v duckdb >/dev/null; then
  scripts_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  for candidate in "${scripts_dir}/duckdb" "${HOME}/.local/bin/duckdb"; do
    if [[ -x "${candidate}" ]]; then export PM_DUCKDB_CLI="${candidate}"; break; fi
  done
fi

cargo test --locked "$@"
