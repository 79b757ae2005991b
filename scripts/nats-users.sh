#!/usr/bin/env bash
# Sourced by run.sh and cluster.sh: the NATS users of nats/auth.conf and
# their passwords, generated once into $DATA_DIR/nats-users.env (mode 600)
# and exported for nats-server. `start_as USER CMD...` runs a service with
# its NATS identity.
nats_users_file="$DATA_DIR/nats-users.env"
if [ ! -s "$nats_users_file" ]; then
  (
    umask 077
    for user in GATEWAY STREAMER PERSISTER ADMIN; do
      printf '%s_NATS_PASSWORD=%s\n' "$user" "$(head -c 24 /dev/urandom | base64 | tr -d '\n/+=')"
    done >"$nats_users_file"
  )
fi
set -a
# shellcheck source=/dev/null
source "$nats_users_file"
set +a

# Meant for a background job (`start_as gateway bin &`): it execs, so the
# job's pid is the service's and a TERM to it reaches the service.
start_as() { # user command...
  local user="$1"; shift
  local var
  var="$(printf '%s' "$user" | tr '[:lower:]' '[:upper:]')_NATS_PASSWORD"
  NATS_USER="$user" NATS_PASSWORD="${!var}" exec "$@"
}
