"""Flows baked into the test image (local/prefect-flow). Entry points are
`/opt/flows/flows.py:<function>`; the worker tests create deployments that point here."""
import os
import sys

from prefect import flow


@flow(name="hello")
def hello(name: str = "world") -> str:
    print(f"hello {name} from {os.uname().nodename}")
    return f"hello {name}"


@flow(name="fails")
def fails() -> None:
    raise RuntimeError("this flow fails on purpose")


@flow(name="exit-code")
def exit_code(code: int = 3) -> None:
    print(f"exiting with {code}", flush=True)
    sys.stdout.flush()
    os._exit(code)
