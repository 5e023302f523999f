#!/usr/bin/env bash
# The benchmark of issue #7, one command: docker-worker vs prefect-docker's Python worker.
#   bench/run.sh                 full run (all scenarios; ~see bench/README.md for timings)
#   bench/run.sh --quick         small sizes, one repeat
#   bench/run.sh --only startup,idle --repeats 5
# BENCH_SKIP_ENV=1 skips scripts/test-env.sh, BENCH_SKIP_BUILD=1 skips the release build.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DW_TEST_VENV:-$REPO/.test-env/venv}
if [[ -z ${BENCH_SKIP_ENV:-} ]]; then
  echo "[bench] preparing the environment (scripts/test-env.sh)" >&2
  "$REPO/scripts/test-env.sh" >&2
fi
if [[ -z ${BENCH_SKIP_BUILD:-} ]]; then
  echo "[bench] building target/release/docker-worker" >&2
  (cd "$REPO" && cargo build --release --bin docker-worker) >&2
fi
exec "$VENV/bin/python" "$REPO/bench/bench.py" "$@"
