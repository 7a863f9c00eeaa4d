# shellcheck shell=bash
# Sourced by the benchmark scripts: their settings come from the environment, so the only
# argument they take is -h/--help, which prints the script's header comment (line 2 up to
# `set -euo pipefail`). Usage: . "$(dirname "$0")/bench-args.sh" "$0" "$@"
case "${2:-}" in
  "") ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$1"
    exit 0
    ;;
  *)
    echo "error: unexpected argument \`$2\`: settings come from the environment (see --help)" >&2
    exit 2
    ;;
esac
