#!/usr/bin/env python3
"""What one API call of each kind a worker makes per run costs the Prefect server (CPU of its
process tree, and of PostgreSQL's with --db postgres): N runs, then each call N times in a row,
one at a time, timing the server's CPU around each batch. Not part of the benchmark's figures;
it explains them (bench/README.md, "What bounds the figures"). Run with the test venv's python:
    .test-env/venv/bin/python bench/percall.py [--db postgres] [--n 50]
"""
import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--venv", default=str(bench.REPO / ".test-env/venv"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dw-percall-"))
    pg = bench.PostgresCluster(work) if a.db == "postgres" else None
    server = bench.PrefectServer(Path(a.venv), work, database_url=pg.url if pg else None)
    try:
        api = bench.Api(server.api_url)
        pool = f"percall-{uuid.uuid4().hex[:6]}"
        api.create_pool(pool, {"job_configuration": {"command": "{{ command }}"},
                                "variables": {"properties": {"command": {"type": "string"}}}})
        dep = api.create_deployment(pool, "exit-code", "flows.py:exit_code", {})
        runs = api.create_runs(dep, a.n)
        flow_id = api.read_run(runs[0])["flow_id"]
        time.sleep(3)

        def cpu():
            return bench.sample(server.proc.pid)["cpu"], (bench.sample(pg.proc.pid)["cpu"] if pg else 0.0)

        def state(name, kind="PENDING"):
            return {"state": {"type": kind, "name": name, "message": None,
                              "state_details": {}}, "force": False}

        calls = [
            ("POST get_scheduled_flow_runs", lambda r: api.call("POST", f"work_pools/{pool}/get_scheduled_flow_runs",
                                                                 {"work_queue_names": []})),
            ("GET deployments/{id}", lambda r: api.call("GET", f"deployments/{dep}")),
            ("GET flows/{id}", lambda r: api.call("GET", f"flows/{flow_id}")),
            ("GET flow_runs/{id}", lambda r: api.call("GET", f"flow_runs/{r}")),
            ("POST set_state Pending", lambda r: api.call("POST", f"flow_runs/{r}/set_state", state("Pending"))),
            ("GET flow_run_states/", lambda r: api.call("GET", f"flow_run_states/?flow_run_id={r}")),
            ("PATCH flow_runs/{id}/labels", lambda r: api.call("PATCH", f"flow_runs/{r}/labels",
                                                               {"prefect.worker.name": "w", "prefect.worker.type": "docker",
                                                                "prefect.work-pool.name": pool})),
            ("POST set_state Submitting", lambda r: api.call("POST", f"flow_runs/{r}/set_state", state("Submitting"))),
            ("PATCH flow_runs/{id} (infrastructure_pid)", lambda r: api.call("PATCH", f"flow_runs/{r}",
                                                                            {"infrastructure_pid": f"unix:///x:{r}"})),
        ]
        out = {}
        for name, fn in calls:
            idle0, t0 = cpu(), time.monotonic()
            time.sleep(2)  # the server's background over 2 s, subtracted below
            idle1, t1 = cpu(), time.monotonic()
            bg = ((idle1[0] - idle0[0]) / (t1 - t0), (idle1[1] - idle0[1]) / (t1 - t0))
            c0, w0 = cpu(), time.monotonic()
            for r in runs:
                fn(r)
            time.sleep(1)  # work the calls set off (events) lands within the batch
            c1, w1 = cpu(), time.monotonic()
            el = w1 - w0
            out[name] = {"server_ms": 1000 * max(0.0, c1[0] - c0[0] - bg[0] * el) / a.n,
                         "db_ms": 1000 * max(0.0, c1[1] - c0[1] - bg[1] * el) / a.n,
                         "wall_ms": 1000 * (el - 1) / a.n}
            print(f"{name:45s} server {out[name]['server_ms']:6.1f} ms  db {out[name]['db_ms']:5.1f} ms  "
                  f"wall {out[name]['wall_ms']:6.1f} ms per call", flush=True)
        print(json.dumps({"db": a.db, "n": a.n, "per_call": out}))
    finally:
        server.stop()
        if pg:
            pg.stop()


if __name__ == "__main__":
    main()
