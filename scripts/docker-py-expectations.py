#!/usr/bin/env python3
"""Regenerate the docker-py-derived expectations of src/job/create_kwargs.rs.

Two unit tests there compare this worker's handling of `container_create_kwargs` with
docker-py's, row by row:

- `same_create_body_as_docker_py`: each row is (kwargs, the fields docker-py puts in the
  `POST /containers/create` body for them beyond what it sends without them), split into
  `config` (top-level fields) and `host_config` (`HostConfig` fields);
- `docker_py_failures_are_validation_errors`: each row is (kwargs, the exception docker-py
  raises for them, as `Type: message`).

The left column (the kwargs) is what the tests are about and is written by hand; the right
column is docker-py's answer, which this script computes by calling docker-py exactly as
prefect-docker's worker does: `DockerWorker._build_container_settings` drops the kwargs that
are job configuration fields and passes the rest, with the job's own settings, to
`DockerClient.containers.create`, which builds the body with `_create_container_args`,
`ContainerConfig` and `HostConfig` and sends it with `APIClient._post_json` (which drops
top-level nulls). The send is intercepted, so no Docker daemon is needed; the API version is
pinned to 1.41, the one docker-py negotiates with the reference Engine (20.10).

Run it with the test venv's Python, which has prefect-docker and docker-py:

    $DW_TEST_VENV/bin/python scripts/docker-py-expectations.py           # check
    $DW_TEST_VENV/bin/python scripts/docker-py-expectations.py --write   # rewrite, then `cargo fmt`

`--check` (the default) prints every row whose stored answer differs from docker-py's and
exits 1 if there is one. `--write` replaces the stored answers in place. After prefect-docker
or docker-py changes (a new pin in scripts/test-env.sh), run it with `--write`, read the diff
(each changed row is a behaviour change of the reference to follow or to list as a
difference in the README), and run `cargo test --lib job::create_kwargs`.
"""

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "job" / "create_kwargs.rs"

# A row of the body table: (r#"kwargs"#, r#"expected"#).
BODY_ROW = re.compile(r'\(\s*r#"(?P<kwargs>.*?)"#,\s*r#"(?P<answer>.*?)"#,?\s*\)', re.S)
# A row of the failure table: (r#"kwargs"#, "Type: message").
FAILURE_ROW = re.compile(
    r'\(\s*r#"(?P<kwargs>.*?)"#,\s*"(?P<answer>(?:[^"\\]|\\.)*)",?\s*\)', re.S
)


class Sent(Exception):
    """Raised instead of sending the create request; carries its body."""

    def __init__(self, body):
        super().__init__("intercepted")
        self.body = body


def docker_client():
    import docker

    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")

    def intercept(url, data=None, **kwargs):
        raise Sent(json.loads(data))

    client.api._post = intercept
    return client


def job_fields():
    from prefect_docker.worker import DockerWorkerJobConfiguration

    return set(DockerWorkerJobConfiguration.model_fields.keys())


def create_body(client, fields, kwargs):
    """The body docker-py sends for a job with these container_create_kwargs, as
    prefect-docker 0.7.4's `_build_container_settings` + `_create_container` call it (job
    settings left at what a job naming only an image gets; its environment is never empty,
    since the worker always sets the run's id in it)."""
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    extra_hosts = extra.pop("extra_hosts", None)
    settings = dict(
        image="x",
        network=None,
        network_mode=None,
        command=None,
        environment={"PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000"},
        auto_remove=False,
        labels={},
        extra_hosts=extra_hosts,
        volumes=[],
        mem_limit=None,
        memswap_limit=None,
        privileged=False,
        **extra,
    )
    try:
        client.containers.create(name=None, **settings)
    except Sent as sent:
        return sent.body
    raise RuntimeError("docker-py did not send a create request")


def body_answer(client, fields, baseline, kwargs):
    body = create_body(client, fields, kwargs)
    missing = object()
    config = {
        k: v
        for k, v in body.items()
        if k != "HostConfig" and baseline.get(k, missing) != v
    }
    base_host = baseline.get("HostConfig", {})
    host = {
        k: v
        for k, v in body.get("HostConfig", {}).items()
        if base_host.get(k, missing) != v
    }
    return json.dumps({"config": config, "host_config": host})


def failure_answer(client, fields, kwargs):
    try:
        create_body(client, fields, kwargs)
    except Exception as e:  # noqa: BLE001 - docker-py's own exception is the answer
        return f"{type(e).__name__}: {e}"
    return "(no error)"


def table(text, test_name):
    """The span of the `let table … = &[ … ];` of the test function `test_name`."""
    start = text.index(f"fn {test_name}()")
    open_at = text.index("&[", start)
    close_at = text.index("];", open_at)
    return open_at, close_at


def rust_string(text):
    return text.replace("\\", "\\\\").replace('"', '\\"')


def from_rust_string(text):
    return re.sub(r"\\(.)", r"\1", text)


def process(text, test_name, row, compute, same, encode):
    """Rows of one table whose stored answer differs, and the table rewritten."""
    open_at, close_at = table(text, test_name)
    region = text[open_at:close_at]
    differing = []
    count = 0

    def replace(match):
        nonlocal count
        count += 1
        kwargs = json.loads(match.group("kwargs"))
        stored = match.group("answer")
        fresh = compute(kwargs)
        if same(stored, fresh):
            return match.group(0)
        differing.append((match.group("kwargs"), stored, fresh))
        start, end = match.span("answer")
        whole = match.group(0)
        offset = match.start()
        return whole[: start - offset] + encode(fresh) + whole[end - offset :]

    rewritten = row.sub(replace, region)
    if count == 0:
        sys.exit(f"no rows found in {test_name}: has the table's layout changed?")
    return differing, count, text[:open_at] + rewritten + text[close_at:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the stored answers")
    parser.add_argument("--file", type=pathlib.Path, default=SOURCE)
    args = parser.parse_args()

    import docker
    import prefect_docker

    client = docker_client()
    fields = job_fields()
    baseline = create_body(client, fields, {})
    text = args.file.read_text()

    bodies, body_rows, text = process(
        text,
        "same_create_body_as_docker_py",
        BODY_ROW,
        lambda kwargs: body_answer(client, fields, baseline, kwargs),
        lambda stored, fresh: json.loads(stored) == json.loads(fresh),
        lambda fresh: fresh,
    )
    failures, failure_rows, text = process(
        text,
        "docker_py_failures_are_validation_errors",
        FAILURE_ROW,
        lambda kwargs: failure_answer(client, fields, kwargs),
        lambda stored, fresh: from_rust_string(stored) == fresh,
        rust_string,
    )
    print(
        f"docker-py {docker.__version__}, prefect-docker {prefect_docker.__version__}: "
        f"{body_rows} create bodies, {failure_rows} failures checked"
    )
    for kwargs, stored, fresh in bodies + failures:
        print(f"\n{kwargs}\n  stored:    {stored}\n  docker-py: {fresh}")
    if args.write:
        args.file.write_text(text)
        changed = len(bodies) + len(failures)
        print(f"{changed} rows rewritten in {args.file}" + ("; now run `cargo fmt`" if changed else ""))
        return 0
    return 1 if bodies or failures else 0


if __name__ == "__main__":
    sys.exit(main())
