#!/usr/bin/env bash
# The production topology on one machine, to try it: 3 nats-server nodes
# (R3 streams), 2 gateways, 2 streamers, 2 persisters (each its own SQLite
# file), one Postgres, the local LLM. Ctrl-C stops everything.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --cluster "$@"
