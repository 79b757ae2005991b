#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting,
# lints, and runs every test. Integration tests start their own nats-server,
# Postgres clusters and LLM servers on random ports in temp dirs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=setup.sh
source scripts/setup.sh

log() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
cargo test --workspace --locked
