#!/usr/bin/env bash
# One-command quickstart: builds the worker, starts a local Prefect server from the test venv,
# creates a work pool, a deployment of the `hello` flow (baked into local/prefect-flow:3.9.1)
# and a flow run, then runs `docker-worker start --run-once` until the flow has finished.
# Exits 0 when the run is Completed. Uses only this machine (127.0.0.1).
#   QUICKSTART_DB=postgres   put the server on a private PostgreSQL cluster (Debian's postgresql,
#                            data in .test-env/quickstart/pg, port QUICKSTART_PG_PORT or 5433)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${QUICKSTART_PORT:-4200}
POOL=${QUICKSTART_POOL:-quickstart-pool}
STATE_DIR=$PWD/.test-env/quickstart
mkdir -p "$STATE_DIR"

env_line=$(scripts/test-env.sh)
VENV=${env_line#DW_TEST_VENV=}
cargo build --release --locked
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

server_pid=""
pg_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  [ -n "$pg_pid" ] && kill -INT "$pg_pid" 2>/dev/null || true
}
trap cleanup EXIT

# PostgreSQL, as production Prefect runs: a private cluster owned by the `postgres` user.
start_postgres() {
  local bin pg_dir=$STATE_DIR/pg pg_port=${QUICKSTART_PG_PORT:-5433}
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  [ -x "$bin/postgres" ] || { echo "PostgreSQL is missing: apt-get install postgresql" >&2; exit 1; }
  as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
  install -d -o postgres -g postgres -m 0700 "$pg_dir"
  [ -f "$pg_dir/data/PG_VERSION" ] || as_pg "$bin/initdb" --auth=trust --username=postgres -D "$pg_dir/data" >/dev/null
  # setpriv itself in the background (not the function, whose subshell would be $!), so the
  # PID the clean-up signals is the server's own.
  setpriv --reuid=postgres --regid=postgres --init-groups -- \
    "$bin/postgres" -D "$pg_dir/data" -p "$pg_port" -k "$pg_dir" -c listen_addresses=127.0.0.1 \
    >"$STATE_DIR/postgres.log" 2>&1 &
  pg_pid=$!
  for _ in $(seq 1 60); do "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 1; done
  "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres prefect 2>/dev/null || true
  export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:$pg_port/prefect"
  echo "PostgreSQL on 127.0.0.1:$pg_port (log: $STATE_DIR/postgres.log)"
}

if ! curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  if [ "${QUICKSTART_DB:-sqlite}" = postgres ]; then start_postgres; fi
  echo "starting a Prefect server on 127.0.0.1:$PORT (log: $STATE_DIR/server.log)"
  PREFECT_HOME=$STATE_DIR/home PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false \
    "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PORT" >"$STATE_DIR/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 180); do curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break; sleep 1; done
fi

api() { # METHOD PATH [JSON] → response body
  curl -fsS -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "$PREFECT_API_URL/$2"
}
field() { "$VENV/bin/python" -c "import json,sys; print(json.load(sys.stdin)$1)"; }

api POST work_pools/ "{\"name\":\"$POOL\",\"type\":\"docker\"}" >/dev/null 2>&1 || true
flow_id=$(api POST flows/ '{"name":"hello"}' | field '["id"]')
dep_id=$(api POST deployments/ "{\"flow_id\":\"$flow_id\",\"name\":\"quickstart\",\"work_pool_name\":\"$POOL\",
  \"entrypoint\":\"flows.py:hello\",
  \"pull_steps\":[{\"prefect.deployments.steps.set_working_directory\":{\"directory\":\"/opt/flows\"}}],
  \"job_variables\":{\"image\":\"local/prefect-flow:3.9.1\"}}" | field '["id"]')
run_id=$(api POST "deployments/$dep_id/create_flow_run" '{}' | field '["id"]')
echo "created flow run $run_id; starting the worker"

target/release/docker-worker start --pool "$POOL" --run-once

state=$(api GET "flow_runs/$run_id" | field '["state"]["type"]')
echo "flow run $run_id finished in state $state"
[ "$state" = COMPLETED ]
