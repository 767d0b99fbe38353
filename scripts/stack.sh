#!/usr/bin/env bash
# Runs the whole Volley stack on this machine: provider simulator, batch-state, gateway and
# the five workers, after migrations and a fresh dev API key.
#   scripts/stack.sh run    in the foreground (Ctrl-C stops everything)
#   scripts/stack.sh up     in the background (logs and pids under .volley/)
#   scripts/stack.sh down   stops a background stack
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
state=.volley
mkdir -p "$state/logs"
bin=${CARGO_TARGET_DIR:-target}/debug

down() {
  if [ -f "$state/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$state/pids"
    # Give workers their grace period to finish or hand back jobs.
    for _ in $(seq 1 40); do
      alive=0
      while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$state/pids"
      [ $alive -eq 0 ] && break
      sleep 0.25
    done
    rm -f "$state/pids"
    echo "stack stopped"
  fi
}

if [ "$mode" = down ]; then
  down
  exit 0
fi
[ -f "$state/pids" ] && down

scripts/services.sh
# The same targets as `make test`, so both unify features alike and neither rebuilds the
# other's binaries.
cargo build --workspace --all-targets -q

export VOLLEY_CONFIG=${VOLLEY_CONFIG:-config/volley.toml}
export RUST_LOG=${RUST_LOG:-info}
# The local stack is a development stack: its secrets are made here, not by an operator.
export VOLLEY_DEV_MODE=true
# Webhooks to a receiver on this machine (plain http on loopback); production allows only
# https to public addresses.
export VOLLEY_WEBHOOK_HTTP_HOSTS=${VOLLEY_WEBHOOK_HTTP_HOSTS:-127.0.0.1,localhost}
export VOLLEY_WEBHOOK_ALLOW_PRIVATE_NETWORK=${VOLLEY_WEBHOOK_ALLOW_PRIVATE_NETWORK:-true}
if [ ! -s "$state/media-signing-key" ]; then
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/media-signing-key"
fi
VOLLEY_MEDIA_SIGNING_KEY=$(cat "$state/media-signing-key")
export VOLLEY_MEDIA_SIGNING_KEY
# Workers present it to batch-state's internal API.
if [ ! -s "$state/internal-token" ]; then
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/internal-token"
fi
VOLLEY_INTERNAL_TOKEN=$(cat "$state/internal-token")
export VOLLEY_INTERNAL_TOKEN

# The dev database: created once, migrated every time.
db=$(sed -n 's|^database_url *= *"postgres://[^/]*/\([A-Za-z0-9_]*\)".*|\1|p' "$VOLLEY_CONFIG")
db=${db:-volley}
if ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'" postgres | grep -q 1; then
  createdb -h 127.0.0.1 -U postgres "$db"
fi
"$bin/batchctl" migrate
"$bin/batchctl" keys revoke dev >/dev/null 2>&1 || true
# Admin, so the local console's operator page works too.
"$bin/batchctl" keys create --name dev --admin | tail -n 1 >"$state/dev-api-key"
echo "dev API key (also in $state/dev-api-key): $(cat "$state/dev-api-key")"

: >"$state/pids"
start() {
  local name=$1
  shift
  env "$@" "$bin/$name" >>"$state/logs/$name.log" 2>&1 &
  echo $! >>"$state/pids"
}
start provider-sim VOLLEY_SIM_ADDR=127.0.0.1:9100
start batch-state
start gateway
port=8091
for w in llm image video music tts; do
  start "worker-$w" VOLLEY_WORKER_ADDR=127.0.0.1:$port
  port=$((port + 1))
done

for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then break; fi
  sleep 0.2
done
if ! curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then
  echo "the gateway did not become ready; see $state/logs/" >&2
  down
  exit 1
fi
echo "Volley is up: gateway http://127.0.0.1:8080, logs in $state/logs/"
echo "Web console: http://127.0.0.1:8080/console/ (sign in with the dev API key above)"

if [ "$mode" = up ]; then
  exit 0
fi
trap 'down; exit 0' INT TERM
echo "Ctrl-C stops the stack."
tail -n 0 -q -f "$state"/logs/*.log &
echo $! >>"$state/pids"
wait
