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
#   scripts/bench.sh compare [OPTIONS] issue 11's comparison: the upstream
#       directly, the gateway over WebSocket, the gateway's OpenAI endpoint
#       and the LiteLLM proxy at 1, 50, 200 and 1,000 concurrent streams,
#       interleaved, with a persister in the measured stack; then the highest
#       WebSocket rate and memory per idle WebSocket; writes its section of
#       BENCHMARKS.md. Installs LiteLLM (PyPI litellm[proxy], pinned) into
#       $DATA_DIR/litellm-venv when missing; the load tool starts it on a
#       random loopback port with a generated config (the stand-in as its
#       only model) and stops it. Offline, the run goes on without LiteLLM and
#       the report says why. Takes about 10 minutes on 2 cores.
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

log "cargo build --release -p loadgen -p gateway -p persister"
cargo build --release -p loadgen -p gateway -p persister
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
MODE=chat
case "${1:-}" in
  chat | persister | scan | compare)
    MODE="$1"
    shift
    ;;
esac

# LiteLLM for `compare`: its own venv (its dependencies stay out of the
# project's), installed once per pinned version.
LITELLM_VERSION="1.108.7"
LITELLM_VENV="${LITELLM_VENV:-$DATA_DIR/litellm-venv}"
LITELLM_LOG="$LITELLM_VENV-install.log"
ensure_litellm() {
  local stamp="$LITELLM_VENV/.installed-$LITELLM_VERSION"
  [ -f "$stamp" ] && [ -x "$LITELLM_VENV/bin/litellm" ] && return 0
  log "installing litellm[proxy]==$LITELLM_VERSION into $LITELLM_VENV (log: $LITELLM_LOG)"
  python3 -m venv "$LITELLM_VENV" >"$LITELLM_LOG" 2>&1 &&
    "$LITELLM_VENV/bin/pip" install --disable-pip-version-check \
      "litellm[proxy]==$LITELLM_VERSION" >>"$LITELLM_LOG" 2>&1 &&
    touch "$stamp"
}
extra=()
if [ "$MODE" = compare ]; then
  if ensure_litellm; then
    extra+=(--litellm-bin "$LITELLM_VENV/bin/litellm")
  else
    why="pip install 'litellm[proxy]==$LITELLM_VERSION' failed (offline?): $(tail -n 1 "$LITELLM_LOG" | cut -c1-200)"
    log "LiteLLM is not available; the comparison goes on without it: $why"
    extra+=(--litellm-missing "$why")
  fi
fi
exec "$TARGET_DIR/release/loadgen" "$MODE" "${extra[@]}" "$@"
