#!/usr/bin/env bash
# The project's one test command: prepares the real peers (Docker daemon, Prefect venv, local
# images) and runs every test layer — unit, real Docker, real Prefect server, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
env_line=$(scripts/test-env.sh)
export "${env_line##*$'\n'}"
cargo test --locked --all-targets "$@"
