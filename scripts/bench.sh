#!/usr/bin/env bash
# Benchmarks the chat path on this machine and writes BENCHMARKS.md:
# time to first token through the gateway against clients reading the
# upstream directly, token frames per second, that no frame is lost, the
# highest token rate, and memory per idle authenticated WebSocket.
# The load tool starts everything it measures itself, on loopback, and stops
# by itself.
#
# Usage:
#   scripts/bench.sh [chat] [OPTIONS]   the chat path (default; e.g. `scripts/bench.sh --idle 5000`)
#   scripts/bench.sh persister [OPTIONS] the persister: SQLite ingest and the
#       Postgres drain after an outage; appends its section to BENCHMARKS.md
#   scripts/bench.sh scan [OPTIONS]     the scan path: 5 MB uploads to 202
#       (raw and multipart, against an HTTP sink and the object store alone),
#       first SSE event for scans in flight, local classification time and
#       the pipeline from upload to result; writes its section of BENCHMARKS.md
# Options go to the `loadgen` subcommand (`scripts/bench.sh persister --help`
# lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=setup.sh
source scripts/setup.sh

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }

# 20,000 idle sockets need as many descriptors in the gateway process and in
# the load tool: raise the soft limit (to the hard one when that is lower).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"

log "cargo build --release -p loadgen -p gateway"
cargo build --release -p loadgen -p gateway
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
MODE=chat
case "${1:-}" in
  chat | persister | scan)
    MODE="$1"
    shift
    ;;
esac
exec "$TARGET_DIR/release/loadgen" "$MODE" "$@"
