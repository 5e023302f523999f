#!/usr/bin/env bash
# The project's one test command: prepares the real peers (Docker daemon, Prefect venv, local
# images, PostgreSQL) and runs every test layer — unit, real Docker, real Prefect server, end to
# end, the fleet — with the Prefect servers on SQLite; then, with no arguments given, runs the
# suites whose behaviour depends on the server's database (e2e, conformance, the worker channel,
# R1 and R4) a second time with their servers on PostgreSQL (DW_TEST_DB=postgres).
#   scripts/test.sh                  everything, both databases
#   scripts/test.sh --test e2e       one binary, SQLite (DW_TEST_DB=postgres for PostgreSQL)
set -euo pipefail
cd "$(dirname "$0")/.."
env_line=$(scripts/test-env.sh)
export "${env_line##*$'\n'}"
cargo test --locked --all-targets "$@"
if [ $# -eq 0 ]; then
  echo "== the database-sensitive suites again, on PostgreSQL (DW_TEST_DB=postgres) =="
  DW_TEST_DB=postgres cargo test --locked \
    --test e2e --test conformance --test worker_channel --test reliability -- \
    --skip create_kwargs_expectations --skip oom_kill --skip r2_ --skip r3_ --skip r7_
fi
