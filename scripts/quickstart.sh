#!/usr/bin/env bash
# One-command quickstart: builds the worker, starts a local Prefect server from the test venv,
# creates a work pool, a deployment of the `hello` flow (baked into local/prefect-flow:3.9.1)
# and a flow run, then runs `docker-worker start --run-once` until the flow has finished.
# Exits 0 when the run is Completed. Uses only this machine (127.0.0.1).
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
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
if ! curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then
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
