#!/usr/bin/env python3
"""Side-by-side benchmark of docker-worker (Rust) and prefect-docker's Python worker (issue #7).

One Prefect server (from the test venv, private PREFECT_HOME, free loopback port), the local
Docker Engine, and both workers in the same invocation. Each worker talks to the server through
a small recording TCP proxy of ours, which timestamps every HTTP request line it forwards (first
poll, API calls per minute). Docker timings come from the Engine's event stream; CPU, RSS and
threads from /proc. See bench/README.md for the definitions. Run through bench/run.sh.

Only the Python standard library and httpx (installed by prefect in the venv) are used.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = "local/busybox:dw"
FLOW_IMAGE = "local/prefect-flow:3.9.1"
DOCKER_SOCK = "/var/run/docker.sock"
BENCH_LABEL = "dev.docker-worker.bench"          # = session id, on every container we create
GROUP_LABEL = "dev.docker-worker.bench.group"    # = pool name (or floor-<n>), per measurement
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
SCENARIOS = ["startup", "idle", "throughput", "flows", "scale", "pickup"]
WORKERS = ["rust", "python"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pctl(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


def parse_ts(s: str) -> float:
    """RFC 3339 (Docker's nanoseconds, Prefect's microseconds) → Unix seconds."""
    if not s or s.startswith("0001-"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", s)
    if not m:
        raise ValueError(s)
    base = dt.datetime.fromisoformat(m.group(1) + (m.group(3) or "+00:00").replace("Z", "+00:00"))
    return base.timestamp() + (float(m.group(2)) if m.group(2) else 0.0)


# ----------------------------------------------------------------------------- /proc

def proc_stat(pid: int):
    """(ppid, cpu seconds) of one process, or None if gone. The CPU includes the children it
    reaped (cutime, cstime): PostgreSQL backends and short-lived helpers come and go."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / CLK_TCK


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
                elif k == "Threads":
                    out[k] = int(v)
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st:
                children[st[0]].append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def sample(pid: int) -> dict:
    """CPU seconds, RSS, HWM and threads summed over the process tree of pid."""
    pids = tree(pid)
    cpu = rss = hwm = threads = 0
    alive = 0
    for p in pids:
        st = proc_stat(p)
        if not st:
            continue
        alive += 1
        cpu += st[1]
        s = proc_status(p)
        rss += s.get("VmRSS", 0)
        hwm += s.get("VmHWM", 0)
        threads += s.get("Threads", 0)
    return {"t": time.monotonic(), "cpu": cpu, "rss": rss, "hwm": hwm, "threads": threads,
            "procs": alive}


def find_pid(comm: str):
    """The pid of the (first) process named `comm` (e.g. dockerd), read-only use."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == comm:
                        return int(name)
            except OSError:
                pass
    return None


def cpu_of(pid):
    st = proc_stat(pid) if pid else None
    return st[1] if st else None


class Sampler(threading.Thread):
    """Samples a process tree every `interval` seconds (peak RSS, process count)."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            self.samples.append(sample(self.pid))
            self.stop_flag.wait(self.interval)

    def stop(self):
        self.stop_flag.set()
        self.join(5)

    def peak(self, key):
        return max((s[key] for s in self.samples), default=0)


# ----------------------------------------------------------------------------- recording proxy

REQ_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


class HttpScanner:
    """Follows one direction of an HTTP/1.1 byte stream (requests or responses) and reports
    each message's start line: `on_head(match, headers)`."""

    def __init__(self, start_re, on_head):
        self.buf = b""
        self.start_re = start_re
        self.on_head = on_head
        self.body_left = 0
        self.chunked = False
        self.upgraded = False
        self.no_body_next = []  # responses: the request methods, to know HEAD has no body

    def feed(self, data: bytes):
        if self.upgraded:
            return
        self.buf += data
        while True:
            if self.body_left:
                n = min(self.body_left, len(self.buf))
                self.buf = self.buf[n:]
                self.body_left -= n
                if self.body_left:
                    return
            if self.chunked:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(self.buf[:line_end].split(b";")[0].strip() or b"0", 16)
                if size == 0:  # last chunk, then optional trailers and an empty line
                    end = self.buf.find(b"\r\n\r\n", line_end)
                    if end < 0:
                        return
                    self.buf = self.buf[end + 4:]
                    self.chunked = False
                    continue
                if len(self.buf) < line_end + 2 + size + 2:
                    return
                self.buf = self.buf[line_end + 2 + size + 2:]
                continue
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buf) > 1 << 20:
                    self.buf = b""
                return
            head, self.buf = self.buf[:head_end], self.buf[head_end + 4:]
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            m = self.start_re.match(lines[0])
            no_body = self.on_head(m, headers) if m else False
            if (self.start_re is REQ_LINE and headers.get(b"upgrade")) or \
                    (self.start_re is STATUS_LINE and m and m.group(1) == b"101"):
                self.upgraded = True  # websocket frames from here on
                return
            if no_body:
                continue
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self.chunked = True
            else:
                self.body_left = int(headers.get(b"content-length", b"0") or 0)


class ProxyLoop:
    """One asyncio loop in a thread, hosting any number of recording proxies."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class Proxy:
    """Forwards 127.0.0.1:port → the Prefect server, recording each request (monotonic time, method,
    path) and its response status and time."""

    def __init__(self, ploop: ProxyLoop, upstream_port: int):
        self.ploop = ploop
        self.upstream = upstream_port
        self.records: list[list] = []  # [t request, method, path, status, t response]
        self.hooks = []  # callables(t, method, path), run on the proxy thread
        self.port = free_port()
        self.server = ploop.call(asyncio.start_server(self._handle, "127.0.0.1", self.port))

    def _record(self, method, path):
        t = time.monotonic()
        rec = [t, method, path, None, None]
        self.records.append(rec)
        for hook in list(self.hooks):
            try:
                hook(t, method, path)
            except Exception:  # a hook must never break forwarding
                traceback.print_exc()
        return rec

    async def _handle(self, creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cwriter.close()
            return
        inflight = collections.deque()

        def on_request(m, headers):
            inflight.append(self._record(m.group(1).decode(), m.group(2).decode("latin-1")))
            return False

        def on_response(m, headers):
            status = int(m.group(1))
            if status == 100:
                return True
            if inflight:
                rec = inflight.popleft()
                rec[3], rec[4] = status, time.monotonic()
                return rec[1] == "HEAD" or status in (204, 304)
            return False

        scanner = HttpScanner(REQ_LINE, on_request)
        rscanner = HttpScanner(STATUS_LINE, on_response)

        async def pipe(reader, writer, scanner):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    try:
                        scanner.feed(data)
                    except Exception:  # never let bookkeeping break forwarding
                        traceback.print_exc()
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                for w in (cwriter, swriter):
                    try:
                        w.close()
                    except Exception:
                        pass

        await asyncio.gather(pipe(creader, swriter, scanner), pipe(sreader, cwriter, rscanner))

    def first(self, predicate, after=0.0):
        for t, m, p, *_ in list(self.records):
            if t >= after and predicate(m, p):
                return t
        return None

    def wait_first_poll(self, timeout: float, proc=None) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(is_poll)
            if t is not None:
                return t
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}) before its first poll")
            time.sleep(0.01)
        raise TimeoutError(f"no poll reached the server within {timeout} s")

    def count(self, t0, t1):
        return sum(1 for r in list(self.records) if t0 <= r[0] < t1)

    def by_path(self, t0, t1):
        c = collections.Counter()
        for t, m, p, *_ in list(self.records):
            if t0 <= t < t1:
                c[f"{m} {normalize_path(p)}"] += 1
        return dict(c.most_common())

    def statuses(self):
        """Response status counts, and the slowest request kinds (median latency)."""
        st = collections.Counter(str(r[3]) for r in self.records)
        lat = collections.defaultdict(list)
        for t, m, p, status, tr in list(self.records):
            if tr is not None:
                lat[f"{m} {normalize_path(p)}"].append(tr - t)
        slow = sorted(((median(v), k, len(v), max(v)) for k, v in lat.items()), reverse=True)[:6]
        errors = collections.Counter(f"{r[1]} {normalize_path(r[2])} → {r[3]}" for r in self.records
                                     if r[3] is not None and r[3] >= 500)
        unanswered = collections.Counter(f"{r[1]} {normalize_path(r[2])}" for r in self.records if r[3] is None)
        return {"status_counts": dict(st), "errors": dict(errors), "unanswered": dict(unanswered),
                "slowest": [{"request": k, "n": n, "median_ms": round(md * 1000, 1), "max_ms": round(mx * 1000, 1)}
                            for md, k, n, mx in slow]}

    def close(self):
        self.ploop.loop.call_soon_threadsafe(self.server.close)


def is_poll(method, path):
    return method == "POST" and path.split("?")[0].endswith("/get_scheduled_flow_runs")


UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalize_path(p):
    p = p.split("?")[0]
    p = UUID_RE.sub("{id}", p)
    return re.sub(r"/work_pools/[^/]+", "/work_pools/{pool}", p)


# ----------------------------------------------------------------------------- Docker Engine

class Docker:
    """Docker Engine API over the unix socket (httpx), plus a live event recorder."""

    def __init__(self, session: str):
        self.session = session
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=DOCKER_SOCK),
                                 base_url="http://docker", timeout=120)
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.thread = None

    def get(self, path, **params):
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def version(self):
        return self.get("/version")

    def info(self):
        return self.get("/info")

    # events ------------------------------------------------------------
    def start_events(self):
        ready = threading.Event()
        self.thread = threading.Thread(target=self._events_loop, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _events_loop(self, ready):
        filters = json.dumps({"type": ["container"], "label": [f"{BENCH_LABEL}={self.session}"]})
        since = f"{time.time() - 1:.9f}"
        seen = set()
        client = httpx.Client(transport=httpx.HTTPTransport(uds=DOCKER_SOCK), base_url="http://docker",
                              timeout=httpx.Timeout(10, read=1.0))
        while not self.stop_flag.is_set():
            try:
                with client.stream("GET", "/events", params={"filters": filters, "since": since}) as r:
                    ready.set()
                    for line in r.iter_lines():
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        key = (ev.get("id"), ev.get("Action"), ev.get("timeNano"))
                        if key in seen:
                            continue
                        seen.add(key)
                        attrs = ev.get("Actor", {}).get("Attributes", {})
                        rec = {"t": ev["timeNano"] / 1e9, "action": ev.get("Action", ev.get("status")),
                               "id": ev.get("id"), "group": attrs.get(GROUP_LABEL),
                               "run": attrs.get("io.prefect.flow-run-id")}
                        with self.lock:
                            self.events.append(rec)
                        since = f"{ev['timeNano'] / 1e9 - 0.001:.9f}"
                        if self.stop_flag.is_set():
                            break
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
                ready.set()
            except Exception as e:  # keep recording whatever happens
                ready.set()
                log(f"docker events: {e!r}")
                time.sleep(0.5)

    def group_events(self, group, action=None):
        with self.lock:
            return [e for e in self.events if e["group"] == group and (action is None or e["action"] == action)]

    def wait_events(self, group, action, n, timeout, proc=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = {e["id"] for e in self.group_events(group, action)}
            if len(ids) >= n:
                return True
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}) while waiting for {n} '{action}' events")
            time.sleep(0.1)
        return False

    # containers ----------------------------------------------------------
    def containers(self, label=None):
        lab = [f"{BENCH_LABEL}={self.session}"] + ([label] if label else [])
        return self.get("/containers/json", all="1", filters=json.dumps({"label": lab}))

    def remove_all(self, label=None, parallel=8):
        """Force-removes our containers (only those carrying this session's label)."""
        ids = [c["Id"] for c in self.containers(label)]
        if not ids:
            return 0

        def rm(cid):
            try:
                self.http.delete(f"/containers/{cid}", params={"force": "1", "v": "1"})
            except httpx.HTTPError as e:
                log(f"remove {cid[:12]}: {e!r}")

        with concurrent.futures.ThreadPoolExecutor(parallel) as ex:
            list(ex.map(rm, ids))
        return len(ids)

    def close(self):
        self.stop_flag.set()
        if self.thread:
            self.thread.join(3)


async def engine_floor(session: str, group: str, n: int, parallel: int):
    """The floor: create + start + wait + remove of n busybox `true` containers, `parallel` at
    a time, straight on the Engine API (no CLI)."""
    limits = httpx.Limits(max_connections=parallel * 2, max_keepalive_connections=parallel * 2)
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=DOCKER_SOCK, limits=limits),
                                 base_url="http://docker", timeout=300) as c:
        queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        body = {"Image": BUSYBOX, "Cmd": ["true"],
                "Labels": {BENCH_LABEL: session, GROUP_LABEL: group},
                "HostConfig": {"NetworkMode": "host"}}

        async def slot():
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = await c.post("/containers/create", json=body)
                r.raise_for_status()
                cid = r.json()["Id"]
                (await c.post(f"/containers/{cid}/start")).raise_for_status()
                (await c.post(f"/containers/{cid}/wait")).raise_for_status()
                (await c.delete(f"/containers/{cid}")).raise_for_status()

        await asyncio.gather(*(slot() for _ in range(parallel)))


# ----------------------------------------------------------------------------- Prefect

class PostgresCluster:
    """A private PostgreSQL cluster in the bench work dir: Debian's newest server binaries, run as
    the `postgres` user (initdb refuses root), PostgreSQL's default durability settings (fsync,
    full_page_writes, synchronous_commit on), 127.0.0.1 on a free port. Stopped by its PID."""

    def __init__(self, workdir: Path):
        root = Path("/usr/lib/postgresql")
        majors = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / "bin/postgres").exists()) \
            if root.exists() else []
        if not majors:
            raise SystemExit("PostgreSQL is missing (/usr/lib/postgresql/<major>/bin) — run scripts/test-env.sh")
        self.bin = root / str(majors[-1]) / "bin"
        self.version = majors[-1]
        os.chmod(workdir, 0o711)  # postgres must traverse the (root-owned) work dir
        self.dir = workdir / "postgres"
        subprocess.run(["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", str(self.dir)], check=True)
        self.data = self.dir / "data"
        as_pg = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = "/tmp"
        subprocess.run(as_pg + [str(self.bin / "initdb"), "--auth=trust", "--username=postgres", "--encoding=UTF8",
                                "--pgdata", str(self.data)], env=env, check=True, capture_output=True)
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        logf = open(self.log, "ab")
        os.chown(self.log, int(subprocess.run(["id", "-u", "postgres"], capture_output=True, text=True).stdout), -1)
        # setpriv execs in place: the PID held is the postmaster's own.
        self.proc = subprocess.Popen(
            as_pg + [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                     "-c", "listen_addresses=127.0.0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            if subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("PostgreSQL did not accept connections within 60 s")
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect"],
                       env=env, check=True)
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def settings(self):
        out = {}
        for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                     "max_connections"):
            r = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                "-At", "-c", f"SHOW {name}"], capture_output=True, text=True)
            out[name] = r.stdout.strip()
        return out

    def stop(self):
        """SIGINT to the postmaster (fast shutdown), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class PrefectServer:
    LEAN_OFF = ["CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "EVENT_PERSISTER", "FOREMAN", "LATE_RUNS",
                "PAUSE_EXPIRATIONS", "REPOSSESSOR", "SCHEDULER", "TASK_RUN_RECORDER", "TRIGGERS"]

    def __init__(self, venv: Path, workdir: Path, lean=False, database_url=None):
        self.port = free_port()
        self.home = workdir / "server-home"
        self.home.mkdir(parents=True)
        self.log = workdir / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING")
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        if lean:  # background services off: less SQLite write contention with the workers' calls
            env.update({f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in self.LEAN_OFF})
            env["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] = "false"
        self.proc = subprocess.Popen(
            [str(venv / "bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("prefect server did not become healthy within 180 s")

    def stop(self):
        stop_process(self.proc, group=True)


class Api:
    """Just enough of the Prefect REST API, straight to the server (not through a proxy)."""

    def __init__(self, base: str):
        self.base = base
        self.http = httpx.Client(base_url=base + "/", timeout=60)

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        for attempt in range(20):
            try:
                r = self.http.request(method, path, json=body)
            except httpx.HTTPError:
                time.sleep(min(3, 0.25 * (attempt + 1)))
                continue
            if r.status_code in (502, 503):
                time.sleep(min(3, 0.25 * (attempt + 1)))
                continue
            if r.status_code not in ok:
                raise RuntimeError(f"{method} {path} → {r.status_code}: {r.text[:500]}")
            return r.json() if r.content else None
        raise RuntimeError(f"{method} {path}: no answer after retries")

    def create_pool(self, name, template):
        self.call("POST", "work_pools/", {"name": name, "type": "docker", "base_job_template": template})

    def delete_pool(self, name):
        try:
            self.call("DELETE", f"work_pools/{name}", ok=(200, 204, 404))
        except RuntimeError:
            pass

    def create_deployment(self, pool, flow, entrypoint, job_variables):
        flow_id = self.call("POST", "flows/", {"name": flow})["id"]
        dep = self.call("POST", "deployments/", {
            "flow_id": flow_id, "name": f"bench-{uuid.uuid4().hex[:10]}", "work_pool_name": pool,
            "entrypoint": entrypoint,
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flows"}}],
            "job_variables": job_variables})
        return dep["id"]

    def create_runs(self, dep, n, parallel=4):
        def one(_):
            return self.call("POST", f"deployments/{dep}/create_flow_run", {"job_variables": {}})["id"]
        with concurrent.futures.ThreadPoolExecutor(parallel) as ex:
            return list(ex.map(one, range(n)))

    def read_run(self, rid):
        return self.call("GET", f"flow_runs/{rid}")

    def states(self, rid):
        return self.call("GET", f"flow_run_states/?flow_run_id={rid}")


# ----------------------------------------------------------------------------- workers

def stop_process(proc: subprocess.Popen, group=False, timeout=20):
    """SIGTERM (its own session's process group if `group`), then SIGKILL. Only our children."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
        return proc.wait(10)


class Bench:
    def __init__(self, args):
        self.args = args
        self.session = f"b{uuid.uuid4().hex[:8]}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dw-bench-{self.session}-"))
        self.venv = Path(args.venv)
        self.results: dict = {"session": self.session, "scenarios": {}}
        self.procs: list[subprocess.Popen] = []
        self.pools: list[str] = []
        self.template = None

    # setup ---------------------------------------------------------------
    def setup(self):
        log(f"session {self.session}, work dir {self.workdir}")
        self.docker = Docker(self.session)
        for image in [BUSYBOX] + ([FLOW_IMAGE] if "flows" in self.args.only else []):
            r = self.docker.http.get(f"/images/{image}/json")
            if r.status_code != 200:
                raise SystemExit(f"image {image} is missing — run scripts/test-env.sh")
        self.docker.start_events()
        self.dockerd = find_pid("dockerd")
        self.results["machine"] = machine_info(self.docker, self.args.worker_bin)
        self.pg = None
        db = {"kind": self.args.db}
        if self.args.db == "postgres":
            log("starting a private PostgreSQL cluster")
            self.pg = PostgresCluster(self.workdir)
            db.update(self.pg.settings(), port=self.pg.port)
            log(f"PostgreSQL {db.get('server_version')} on 127.0.0.1:{self.pg.port} (fsync {db.get('fsync')}, "
                f"synchronous_commit {db.get('synchronous_commit')})")
        self.results["database"] = db
        log("starting the Prefect server")
        self.server = PrefectServer(self.venv, self.workdir, lean=self.args.lean_server,
                                    database_url=self.pg.url if self.pg else None)
        self.api = Api(self.server.api_url)
        self.ploop = ProxyLoop()
        out = subprocess.run([str(self.venv / "bin/prefect"), "work-pool", "get-default-base-job-template",
                              "--type", "docker"], capture_output=True, text=True,
                             env={**self.clean_env(), "PREFECT_API_URL": self.server.api_url}, check=True)
        self.template = json.loads(out.stdout)
        log(f"Prefect server on {self.server.api_url}")

    def teardown(self):
        for p in self.procs:
            stop_process(p, group=True, timeout=10)
        try:
            n = self.docker.remove_all()
            if n:
                log(f"removed {n} leftover containers")
        except Exception as e:
            log(f"cleanup: {e!r}")
        self.docker.close()
        if hasattr(self, "server"):
            for pool in self.pools:
                self.api.delete_pool(pool)
            self.server.stop()
        if getattr(self, "pg", None):
            self.pg.stop()
        if not self.args.keep_temp:
            subprocess.run(["rm", "-rf", str(self.workdir)])

    def server_cpu(self):
        """CPU seconds of the Prefect server's process tree."""
        return sample(self.server.proc.pid)["cpu"]

    def db_cpu(self):
        """CPU seconds of the PostgreSQL cluster's process tree (None on SQLite: inside the server)."""
        return sample(self.pg.proc.pid)["cpu"] if self.pg else None

    def clean_env(self):
        keep = ("PATH", "LANG", "LC_ALL", "TZ")
        return {k: v for k, v in os.environ.items() if k in keep}

    def new_pool(self, kind):
        name = f"bench-{self.session}-{kind}-{uuid.uuid4().hex[:6]}"
        self.api.create_pool(name, self.template)
        self.pools.append(name)
        return name

    def job_vars(self, pool, **extra):
        v = {"image_pull_policy": "Never", "labels": {BENCH_LABEL: self.session, GROUP_LABEL: pool}}
        v.update(extra)
        return v

    def start_worker(self, kind, pool, proxy, limit=None, poll_seconds=None, tag=""):
        env = self.clean_env()
        home = self.workdir / f"home-{kind}-{uuid.uuid4().hex[:6]}"
        home.mkdir()
        env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"),
                   PREFECT_API_URL=f"http://127.0.0.1:{proxy.port}/api")
        if poll_seconds is not None:
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_seconds)
        for kv in (self.args.rust_env if kind == "rust" else self.args.python_env) or []:
            k, _, v = kv.partition("=")
            env[k] = v
        if kind == "rust":
            cmd = [self.args.worker_bin, "start", "--pool", pool]
        else:
            cmd = [str(self.venv / "bin/prefect"), "worker", "start", "--pool", pool, "--type", "docker"]
        if limit:
            cmd += ["--limit", str(limit)]
        logf = self.workdir / f"worker-{kind}-{tag or pool}.log"
        wall0, t0 = time.time(), time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=open(logf, "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.t0, proc.wall0, proc.logf, proc.kind = t0, wall0, logf, kind
        self.procs.append(proc)
        return proc

    def stop_worker(self, proc):
        rc = stop_process(proc, group=True)
        if proc in self.procs:
            self.procs.remove(proc)
        return rc

    def tail(self, proc, n=30):
        try:
            return "\n".join(proc.logf.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def workers(self):
        return [w for w in WORKERS if w in self.args.workers]

    # scenarios -------------------------------------------------------------
    def startup(self):
        """Process start → first POST …/get_scheduled_flow_runs reaching the server."""
        a = self.args
        res = {"definition": "process start (just before exec) → first POST /api/work_pools/<pool>/"
                             "get_scheduled_flow_runs seen by the proxy; pool exists with its template",
               "repeats": a.repeats, "warmup": 1}
        pools = {w: self.new_pool(f"startup-{w}") for w in self.workers()}
        per = {w: [] for w in self.workers()}
        shutdown = {w: [] for w in self.workers()}
        outside = {w: [] for w in self.workers()}
        seqs = {}
        for rep in range(a.repeats + 1):  # rep 0 = warm-up (page cache, .pyc), not counted
            for w in self.workers():
                proxy = Proxy(self.ploop, self.server.port)
                proc = self.start_worker(w, pools[w], proxy, poll_seconds=a.poll_seconds, tag=f"startup{rep}")
                try:
                    t = proxy.wait_first_poll(120, proc)
                except Exception:
                    log(self.tail(proc))
                    raise
                dt_ = t - proc.t0
                seqs[w] = [f"{tt - proc.t0:7.3f}s {m} {normalize_path(p)} → {st}" for tt, m, p, st, _ in proxy.records if tt <= t]
                t_stop = time.monotonic()
                rc = self.stop_worker(proc)
                shut = time.monotonic() - t_stop
                proxy.close()
                out = self.startup_outside(w, rep)
                log(f"startup {w} rep {rep}: {dt_ * 1000:.0f} ms; shutdown {shut * 1000:.0f} ms (exit {rc}); "
                    f"from outside: run due at start → container created {out['to_create_s'] * 1000:.0f} ms"
                    + (" (warm-up)" if rep == 0 else ""))
                if rep:
                    per[w].append(dt_)
                    shutdown[w].append(shut)
                    outside[w].append(out)
        res["seconds"] = per
        res["median_s"] = {w: median(v) for w, v in per.items()}
        res["requests_before_first_poll"] = seqs
        res["shutdown_seconds"] = shutdown
        res["shutdown_median_s"] = {w: median(v) for w, v in shutdown.items()}
        res["outside_definition"] = ("one run (busybox `true`) is Scheduled and due before the worker starts: process "
                                     "start (just before exec) → that run's container `create` event on the Engine's "
                                     "event stream (what a user sees of the first poll); also → the Pending proposal "
                                     "reaching the server; its own fresh pool per repeat")
        res["outside"] = outside
        res["outside_median_s"] = {w: {k: median([o.get(k) for o in v]) for k in ("to_create_s", "to_pending_s",
                                                                                  "first_poll_s")}
                                   for w, v in outside.items()}
        return res

    def startup_outside(self, w, rep):
        """Process start → the container of a run due at start is created (Docker event)."""
        a = self.args
        pool = self.new_pool(f"out-{w}")
        dep = self.api.create_deployment(pool, "exit-code", "flows.py:exit_code",
                                         self.job_vars(pool, image=BUSYBOX, command="true", auto_remove=True))
        rid = self.api.create_runs(dep, 1)[0]
        proxy = Proxy(self.ploop, self.server.port)
        proc = self.start_worker(w, pool, proxy, poll_seconds=a.poll_seconds, tag=f"out{rep}")
        try:
            if not self.docker.wait_events(pool, "create", 1, 120, proc):
                raise RuntimeError(f"{w}: the run due at start got no container within 120 s\n{self.tail(proc)}")
            created = min(e["t"] for e in self.docker.group_events(pool, "create"))
            time.sleep(0.3)
        finally:
            self.stop_worker(proc)
            proxy.close()
        pend = proxy.first(lambda m, p: m == "POST" and p.split("?")[0].endswith(f"/flow_runs/{rid}/set_state"))
        poll = proxy.first(is_poll)
        to_create = created - proc.wall0
        return {"to_create_s": to_create, "to_pending_s": pend - proc.t0 if pend else None,
                "first_poll_s": poll - proc.t0 if poll else None,
                "requests_before_create": [f"{tt - proc.t0:7.3f}s {m} {normalize_path(p)} → {st} "
                                           f"({(tr - tt) * 1000 if tr else 0:.0f} ms)"
                                           for tt, m, p, st, tr in proxy.records if tt - proc.t0 <= to_create]}

    def idle(self):
        """RSS, CPU %, threads and API calls over an idle window on an empty pool."""
        a = self.args
        res = {"window_s": a.idle_seconds, "poll_seconds": a.idle_poll_seconds or "Prefect default (10)",
               "definition": "empty pool; window starts 2 s after the first poll; CPU % of one core"}
        for w in self.workers():
            pool = self.new_pool(f"idle-{w}")
            proxy = Proxy(self.ploop, self.server.port)
            proc = self.start_worker(w, pool, proxy, poll_seconds=a.idle_poll_seconds, tag="idle")
            try:
                proxy.wait_first_poll(120, proc)
                time.sleep(2)
                s0, d0 = sample(proc.pid), cpu_of(self.dockerd)
                sampler = Sampler(proc.pid, 1.0)
                sampler.start()
                time.sleep(a.idle_seconds)
                sampler.stop()
                s1, d1 = sample(proc.pid), cpu_of(self.dockerd)
            finally:
                self.stop_worker(proc)
                proxy.close()
            el = s1["t"] - s0["t"]
            r = {"rss_bytes": s1["rss"], "rss_peak_bytes": max(sampler.peak("rss"), s1["rss"]),
                 "hwm_bytes": s1["hwm"], "cpu_percent": 100 * (s1["cpu"] - s0["cpu"]) / el,
                 "threads": s1["threads"], "processes": s1["procs"],
                 "api_calls_per_min": proxy.count(s0["t"], s1["t"]) * 60 / el,
                 "api_calls": proxy.by_path(s0["t"], s1["t"]),
                 "dockerd_cpu_percent": 100 * (d1 - d0) / el if d0 is not None and d1 is not None else None}
            log(f"idle {w}: RSS {r['rss_bytes'] / MiB:.1f} MiB, CPU {r['cpu_percent']:.2f} %, "
                f"threads {r['threads']}, {r['api_calls_per_min']:.1f} calls/min")
            res[w] = r
        return res

    def throughput_worker(self, w, rep):
        a = self.args
        pool = self.new_pool(f"tp-{w}")
        dep = self.api.create_deployment(pool, "exit-code", "flows.py:exit_code",
                                         self.job_vars(pool, image=BUSYBOX, command="true", auto_remove=True))
        self.api.create_runs(dep, a.throughput_runs)
        proxy = Proxy(self.ploop, self.server.port)
        cpu_at_poll, box = {}, {}

        def on_req(t, m, p):
            if is_poll(m, p) and not cpu_at_poll and "pid" in box:
                cpu_at_poll.update(sample(box["pid"]))
                cpu_at_poll["server"] = self.server_cpu()
                cpu_at_poll["db"] = self.db_cpu()

        proxy.hooks.append(on_req)
        proc = self.start_worker(w, pool, proxy, limit=a.throughput_limit, poll_seconds=a.poll_seconds,
                                 tag=f"tp{rep}")
        box["pid"] = proc.pid
        sampler = Sampler(proc.pid, 0.25)
        sampler.start()
        try:
            ok = self.docker.wait_events(pool, "destroy", a.throughput_runs, a.throughput_timeout, proc)
            time.sleep(1)
            s_end = sample(proc.pid)
            server_end, db_end, t_end = self.server_cpu(), self.db_cpu(), time.monotonic()
        finally:
            sampler.stop()
            self.stop_worker(proc)
            proxy.close()
        if not ok:
            log(self.tail(proc))
            raise RuntimeError(f"{w}: not all {a.throughput_runs} containers finished within {a.throughput_timeout} s")
        r = self.span(pool)
        first_poll = proxy.first(is_poll)
        r["process_start_to_last_destroy_s"] = r["last_destroy_wall"] - proc.wall0
        r["cpu_s_total"] = s_end["cpu"]
        r["cpu_s_after_first_poll"] = s_end["cpu"] - cpu_at_poll.get("cpu", 0.0)
        r["cpu_s_per_run"] = r["cpu_s_after_first_poll"] / a.throughput_runs
        r["peak_rss_bytes"] = max(sampler.peak("rss"), s_end["hwm"])
        r["peak_threads"] = sampler.peak("threads")
        r["first_poll_after_start_s"] = first_poll - proc.t0 if first_poll else None
        r["api_calls"] = len(proxy.records)
        # From the first poll to 1 s after the last destroy: what the runs cost the API.
        window = cpu_at_poll.get("t", first_poll or 0), t_end
        r["window_s"] = window[1] - window[0]
        r["api_calls_in_window"] = proxy.count(first_poll or 0, t_end)
        r["api_calls_per_run"] = r["api_calls_in_window"] / a.throughput_runs
        r["api_calls_per_run_by_endpoint"] = {k: round(v / a.throughput_runs, 3)
                                              for k, v in proxy.by_path(first_poll or 0, t_end).items()}
        if "server" in cpu_at_poll:
            r["server_cpu_s"] = server_end - cpu_at_poll["server"]
            r["server_cpu_s_per_run"] = r["server_cpu_s"] / a.throughput_runs
            if cpu_at_poll.get("db") is not None and db_end is not None:
                r["db_cpu_s"] = db_end - cpu_at_poll["db"]
                r["db_cpu_s_per_run"] = r["db_cpu_s"] / a.throughput_runs
        r["api"] = proxy.statuses()
        r["api_calls_by_path"] = proxy.by_path(0, float("inf"))
        r["api_503"] = sum(1 for x in proxy.records if x[3] == 503)
        r["timeline"] = self.timeline(pool, proc.wall0)
        r["slot_pickup"] = self.slot_pickup(pool, a.throughput_limit)
        r["slot_pickup_median_s"] = r["slot_pickup"]["median_s"]
        r.pop("last_destroy_wall", None)
        return r

    def timeline(self, group, wall0):
        """Seconds from worker start of the i-th create/start/destroy (quartiles), for diagnosis."""
        out = {}
        for action in ("create", "start", "destroy"):
            ts = sorted(e["t"] - wall0 for e in self.docker.group_events(group, action))
            if ts:
                out[action] = [round(ts[0], 2), round(pctl(ts, 25), 2), round(pctl(ts, 50), 2),
                               round(pctl(ts, 75), 2), round(ts[-1], 2)]
        return out

    def slot_pickup(self, group, limit):
        """With more runs than --limit: k-th container gone (slot free) → (limit+k)-th create."""
        creates = sorted(e["t"] for e in self.docker.group_events(group, "create"))
        destroys = sorted(e["t"] for e in self.docker.group_events(group, "destroy"))
        gaps = [creates[limit + k] - destroys[k] for k in range(min(len(destroys), len(creates) - limit))]
        return {"median_s": median(gaps), "max_s": max(gaps) if gaps else None, "n": len(gaps)}

    def span(self, group):
        ev = self.docker.group_events(group)
        creates = [e["t"] for e in ev if e["action"] == "create"]
        destroys = [e["t"] for e in ev if e["action"] == "destroy"]
        n = len({e["id"] for e in ev if e["action"] == "create"})
        span = max(destroys) - min(creates)
        return {"containers": n, "span_s": span, "runs_per_s": len(set(e["id"] for e in ev if e["action"] == "destroy")) / span,
                "last_destroy_wall": max(destroys)}

    def throughput(self):
        a = self.args
        res = {"runs": a.throughput_runs, "limit": a.throughput_limit, "poll_seconds": a.poll_seconds,
               "repeats": a.repeats,
               "definition": "busybox `true`, auto_remove, image_pull_policy Never; span = first container "
                             "'create' → last 'destroy' event of the Engine (same for the floor); runs queued "
                             "before the worker starts; worker CPU-s per run counted from its first poll to 1 s "
                             "after the last destroy; floor = create+start+wait+remove on the Engine API with "
                             f"{a.throughput_limit} in parallel"}
        per = {k: [] for k in ["floor"] + self.workers()}
        for rep in range(a.repeats):
            group = f"floor-{self.session}-{rep}"
            # The floor does not touch the server: its CPU meanwhile is the server's own background
            # (services, the other workers' pools being gone), subtracted from the workers' windows.
            b0, bd0, bt0 = self.server_cpu(), self.db_cpu(), time.monotonic()
            asyncio.run(engine_floor(self.session, group, a.throughput_runs, a.throughput_limit))
            self.docker.wait_events(group, "destroy", a.throughput_runs, 30)
            time.sleep(0.5)
            time.sleep(max(0.0, 5 - (time.monotonic() - bt0)))  # at least 5 s of baseline
            b1, bd1, bt1 = self.server_cpu(), self.db_cpu(), time.monotonic()
            f = self.span(group)
            f["server_background_cpu_percent"] = 100 * (b1 - b0) / (bt1 - bt0)
            if bd0 is not None:
                f["db_background_cpu_percent"] = 100 * (bd1 - bd0) / (bt1 - bt0)
            f.pop("last_destroy_wall")
            per["floor"].append(f)
            log(f"throughput floor rep {rep}: {f['span_s']:.2f} s ({f['runs_per_s']:.1f} runs/s)")
            for w in self.workers():
                r = self.throughput_worker(w, rep)
                if "server_cpu_s" in r:  # less the server's background over the same window
                    bg = f["server_background_cpu_percent"] / 100 * r["window_s"]
                    r["server_cpu_s_per_run_net"] = max(0.0, r["server_cpu_s"] - bg) / a.throughput_runs
                    if "db_cpu_s" in r:
                        bgd = f["db_background_cpu_percent"] / 100 * r["window_s"]
                        r["db_cpu_s_per_run_net"] = max(0.0, r["db_cpu_s"] - bgd) / a.throughput_runs
                per[w].append(r)
                log(f"throughput {w} rep {rep}: {r['span_s']:.2f} s ({r['runs_per_s']:.1f} runs/s), "
                    f"{r['cpu_s_per_run'] * 1000:.1f} ms CPU/run, peak RSS {r['peak_rss_bytes'] / MiB:.1f} MiB, "
                    f"{r['api_calls_per_run']:.2f} API calls/run, server CPU/run "
                    f"{r.get('server_cpu_s_per_run', 0) * 1000:.1f} ms (net {r.get('server_cpu_s_per_run_net', 0) * 1000:.1f}), "
                    f"db CPU/run {(r.get('db_cpu_s_per_run') or 0) * 1000:.1f} ms")
        res["reps"] = per
        res["median"] = {k: {m: median([r.get(m) for r in v]) for m in v[0] if isinstance(v[0][m], (int, float))}
                         for k, v in per.items() if v}
        return res

    def flows(self):
        a = self.args
        res = {"runs": a.flow_runs, "limit": a.flow_limit, "poll_seconds": a.poll_seconds,
               "definition": "hello flow in local/prefect-flow:3.9.1; runs created right after the worker's first "
                             "poll; phases from the run's state history (timestamps) and the container's "
                             "State.StartedAt; 'scheduled' = the Scheduled state's scheduled_time"}
        for w in self.workers():
            pool = self.new_pool(f"flows-{w}")
            dep = self.api.create_deployment(pool, "hello", "flows.py:hello",
                                             self.job_vars(pool, image=FLOW_IMAGE,
                                                           env={"PREFECT_API_URL": self.server.api_url}))
            proxy = Proxy(self.ploop, self.server.port)
            proc = self.start_worker(w, pool, proxy, limit=a.flow_limit, poll_seconds=a.poll_seconds, tag="flows")
            try:
                proxy.wait_first_poll(120, proc)
                ids = self.api.create_runs(dep, a.flow_runs)
                deadline = time.monotonic() + a.flow_timeout
                pending = set(ids)
                final = {}
                while pending and time.monotonic() < deadline:
                    for rid in list(pending):
                        run = self.api.read_run(rid)
                        st = run["state"]["type"]
                        if st in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                            final[rid] = st
                            pending.discard(rid)
                    time.sleep(1)
            finally:
                self.stop_worker(proc)
                proxy.close()
            started = {}
            network_mode = None
            for c in self.docker.containers(f"{GROUP_LABEL}={pool}"):
                rid = c["Labels"].get("io.prefect.flow-run-id")
                ins = self.docker.get(f"/containers/{c['Id']}/json")
                started[rid] = parse_ts(ins["State"]["StartedAt"])
                network_mode = ins["HostConfig"]["NetworkMode"]
            self.docker.remove_all(f"{GROUP_LABEL}={pool}")
            phases = collections.defaultdict(list)
            for rid in ids:
                sts = sorted(self.api.states(rid), key=lambda s: s["timestamp"])
                ts = {}
                sched = None
                for s in sts:
                    ts.setdefault(s["type"], parse_ts(s["timestamp"]))
                    if s["type"] == "SCHEDULED":
                        sched = parse_ts((s.get("state_details") or {}).get("scheduled_time") or s["timestamp"])
                sched = max(sched, ts.get("SCHEDULED", sched)) if sched else ts.get("SCHEDULED")
                pend, runn, comp = ts.get("PENDING"), ts.get("RUNNING"), ts.get("COMPLETED")
                cs = started.get(rid)
                for name, x, y in [("scheduled_to_pending", sched, pend), ("pending_to_container_started", pend, cs),
                                   ("container_started_to_running", cs, runn),
                                   ("running_to_completed", runn, comp), ("scheduled_to_completed", sched, comp)]:
                    if x is not None and y is not None:
                        phases[name].append(y - x)
            r = {"final_states": dict(collections.Counter(final.values())), "network_mode": network_mode,
                 "api_503": sum(1 for x in proxy.records if x[3] == 503), "api": proxy.statuses(),
                 "not_final": len(pending),
                 "phases": {k: {"median_s": median(v), "p95_s": pctl(v, 95), "n": len(v)} for k, v in phases.items()}}
            log(f"flows {w}: {r['final_states']} not final {len(pending)}; " + ", ".join(
                f"{k} {v['median_s']:.2f}/{v['p95_s']:.2f}" for k, v in r["phases"].items()))
            res[w] = r
        return res

    def scale_one(self, w):
        a = self.args
        pool = self.new_pool(f"scale-{w}")
        dep = self.api.create_deployment(pool, "exit-code", "flows.py:exit_code",
                                         self.job_vars(pool, image=BUSYBOX, command="sleep 3600",
                                                       **json.loads(a.scale_job_variables or "{}")))
        t = time.monotonic()
        self.api.create_runs(dep, a.scale_runs)
        create_runs_s = time.monotonic() - t
        log(f"scale {w}: created {a.scale_runs} flow runs in {create_runs_s:.1f} s")
        proxy = Proxy(self.ploop, self.server.port)
        proc = self.start_worker(w, pool, proxy, poll_seconds=a.idle_poll_seconds, tag="scale")
        r = {"runs": a.scale_runs, "create_flow_runs_s": create_runs_s}
        try:
            ok = self.docker.wait_events(pool, "start", a.scale_runs, a.scale_timeout, proc)
            starts = [e["t"] for e in self.docker.group_events(pool, "start")]
            r["containers_started"] = len(starts)
            r["worker_start_to_all_running_s"] = (time.monotonic() - proc.t0)
            if not ok:
                log(self.tail(proc))
                raise RuntimeError(f"only {len(starts)}/{a.scale_runs} containers started within {a.scale_timeout} s")
            running = len(self.docker.get("/containers/json", filters=json.dumps(
                {"label": [f"{GROUP_LABEL}={pool}"], "status": ["running"]})))
            r["containers_running"] = running
            r["timeline"] = self.timeline(pool, proc.wall0)
            one = self.docker.containers(f"{GROUP_LABEL}={pool}")[0]
            r["network_mode"] = self.docker.get(f"/containers/{one['Id']}/json")["HostConfig"]["NetworkMode"]
            log(f"scale {w}: {running} running, {r['worker_start_to_all_running_s']:.1f} s after worker start")
            # Submission drained: 5 s without a per-run call (a path naming a run: state, labels, pid).
            t_run = time.monotonic()
            while time.monotonic() - t_run < a.scale_drain_timeout:
                last = max((rec[0] for rec in list(proxy.records) if UUID_RE.search(rec[2])), default=0.0)
                if time.monotonic() - last >= 5:
                    break
                time.sleep(0.5)
            r["all_running_to_drained_s"] = time.monotonic() - t_run
            log(f"scale {w}: submission drained {r['all_running_to_drained_s']:.1f} s after all running")
            s0, d0 = sample(proc.pid), cpu_of(self.dockerd)
            sampler = Sampler(proc.pid, 1.0)
            sampler.start()
            time.sleep(a.scale_window)
            sampler.stop()
            s1, d1 = sample(proc.pid), cpu_of(self.dockerd)
            r["dockerd_cpu_percent"] = 100 * (d1 - d0) / (s1["t"] - s0["t"]) if d0 is not None and d1 is not None else None
            el = s1["t"] - s0["t"]
            r.update({"window_s": el, "rss_bytes": s1["rss"], "rss_peak_bytes": max(sampler.peak("rss"), s1["hwm"]),
                      "cpu_percent": 100 * (s1["cpu"] - s0["cpu"]) / el, "threads": s1["threads"],
                      "threads_peak": sampler.peak("threads"), "processes": s1["procs"],
                      "api_calls_per_min": proxy.count(s0["t"], s1["t"]) * 60 / el,
                      "api_calls": proxy.by_path(s0["t"], s1["t"])})
            r["api_503"] = sum(1 for x in proxy.records if x[3] == 503)
            r["api"] = proxy.statuses()
            log(f"scale {w}: RSS {r['rss_bytes'] / MiB:.1f} MiB, CPU {r['cpu_percent']:.2f} %, threads {r['threads']}, "
                f"{r['api_calls_per_min']:.1f} calls/min")
        finally:
            self.stop_worker(proc)
            proxy.close()
            t = time.monotonic()
            n = self.docker.remove_all(f"{GROUP_LABEL}={pool}")
            r["cleanup_s"] = time.monotonic() - t
            log(f"scale {w}: removed {n} containers in {r['cleanup_s']:.1f} s")
        return r

    def scale(self):
        a = self.args
        res = {"runs": a.scale_runs, "poll_seconds": a.idle_poll_seconds or "Prefect default (10)",
               "definition": "busybox `sleep 3600`, no --limit; measured over a window starting once all "
                             "containers run and the submission drained (5 s without a per-run API call); "
                             "CPU % of one core"}
        for w in self.workers():
            if w == "python" and not a.python_scale:
                res[w] = "skipped (use --python-scale)"
                continue
            res[w] = self.scale_one(w)
        return res

    def pickup(self):
        """Issue #5: a run created "now" → its container starting, our worker with fast pickup
        (the /events/out subscription) and with plain polling (DOCKER_WORKER_FAST_PICKUP=false),
        Prefect's default 10 s poll interval; plus the idle API calls per minute of each mode."""
        a = self.args
        res = {"definition": "flow run created (API call returns) → container start event; runs "
                             "created one at a time, 1–3 s apart, poll interval 10 s (Prefect's "
                             "default); idle calls/min over 60 s on an empty pool",
               "runs": a.pickup_runs}
        import random
        for mode, extra in (("events", {}), ("polling", {"DOCKER_WORKER_FAST_PICKUP": "false"})):
            pool = self.new_pool(f"pickup-{mode}")
            dep = self.api.create_deployment(pool, "exit-code", "flows.py:exit_code",
                                             self.job_vars(pool, image=BUSYBOX, command="true", auto_remove=True))
            proxy = Proxy(self.ploop, self.server.port)
            saved = self.args.rust_env
            self.args.rust_env = list(saved or []) + [f"{k}={v}" for k, v in extra.items()]
            proc = self.start_worker("rust", pool, proxy, poll_seconds=None, tag=f"pickup-{mode}")
            self.args.rust_env = saved
            try:
                proxy.wait_first_poll(120, proc)
                # Idle first: the subscription must not add API calls.
                time.sleep(2)
                # The proxy stamps requests with the monotonic clock.
                t0 = time.monotonic()
                time.sleep(a.pickup_idle_seconds)
                t1 = time.monotonic()
                idle_calls = proxy.count(t0, t1) * 60 / (t1 - t0)
                latencies = []
                for i in range(a.pickup_runs):
                    created = time.time()
                    rid = self.api.call("POST", f"deployments/{dep}/create_flow_run", {"job_variables": {}})["id"]
                    deadline = time.time() + 60
                    start = None
                    while time.time() < deadline and start is None:
                        starts = [e for e in self.docker.group_events(pool, "start") if e["run"] == rid]
                        start = starts[0]["t"] if starts else None
                        time.sleep(0.02)
                    if start is None:
                        raise RuntimeError(f"pickup {mode}: run {rid} never started\n{self.tail(proc)}")
                    latencies.append(start - created)
                    log(f"pickup {mode} {i + 1}/{a.pickup_runs}: {latencies[-1]:.2f} s")
                    time.sleep(random.uniform(1, 3))
            finally:
                self.stop_worker(proc)
                proxy.close()
            res[mode] = {"median_s": median(latencies), "p95_s": pctl(latencies, 95),
                         "max_s": max(latencies), "seconds": latencies,
                         "idle_api_calls_per_min": idle_calls}
        return res

    def run(self):
        self.setup()
        t_all = time.monotonic()
        for name in SCENARIOS:
            if name not in self.args.only:
                continue
            log(f"=== {name}")
            t = time.monotonic()
            load0 = os.getloadavg()
            try:
                r = getattr(self, name)()
            except Exception as e:
                traceback.print_exc()
                r = {"error": repr(e)}
            r["duration_s"] = time.monotonic() - t
            r["loadavg_before"], r["loadavg_after"] = [round(x, 2) for x in load0], \
                [round(x, 2) for x in os.getloadavg()]
            self.results["scenarios"][name] = r
            try:
                self.docker.remove_all()
            except Exception:
                pass
        self.results["duration_s"] = time.monotonic() - t_all


# ----------------------------------------------------------------------------- report

def machine_info(docker: Docker, worker_bin: str) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    v, i = docker.version(), docker.info()
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    try:
        wv = subprocess.run([worker_bin, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[0]
    except OSError:
        wv = "?"
    ident = {}
    try:
        import hashlib
        data = Path(worker_bin).read_bytes()
        st = Path(worker_bin).stat()
        ident = {"worker_bin_sha256": hashlib.sha256(data).hexdigest()[:16], "worker_bin_bytes": st.st_size,
                 "worker_bin_mtime": dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat(timespec="seconds")}
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src", "Cargo.toml",
                                "Cargo.lock"], capture_output=True, text=True)
        ident["git_head"] = head.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return {**ident, "nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_bytes": mem, "kernel": platform.release(),
            "docker_version": v.get("Version"), "storage_driver": i.get("Driver"),
            "docker_worker": wv, "python": platform.python_version(),
            "loadavg_start": " ".join(open("/proc/loadavg").read().split()[:3]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def db_line(db):
    if db.get("kind") == "postgres":
        return (f"PostgreSQL {db.get('server_version')} (private cluster; fsync {db.get('fsync')}, "
                f"synchronous_commit {db.get('synchronous_commit')}, full_page_writes {db.get('full_page_writes')})")
    return "SQLite (the Prefect server's default, in its PREFECT_HOME)"


def ratio(a, b):
    return a / b if a is not None and b else None


def report(results: dict) -> tuple[str, list]:
    """Human table, and the list of target checks."""
    m = results["machine"]
    out = [f"docker-worker benchmark — session {results['session']}, {m['date']}",
           f"machine: {m['nproc']} × {m['cpu_model']}, {m['mem_total_bytes'] / 2**30:.1f} GiB, kernel {m['kernel']}, "
           f"Docker {m['docker_version']} ({m['storage_driver']}), {m['docker_worker']}",
           f"worker binary: sha256 {m.get('worker_bin_sha256')}, {m.get('worker_bin_bytes', 0) / MiB:.1f} MiB, built "
           f"{m.get('worker_bin_mtime')}, git {m.get('git_head')}",
           f"database: {db_line(results.get('database') or {})}; load average (1/5/15 min) at start "
           f"{m.get('loadavg_start')}, at end {results.get('loadavg_end')}", ""]
    rows = []  # (figure, rust, python, ratio, target, verdict)
    checks = []

    def check(name, ok, detail):
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        checks.append({"target": name, "verdict": verdict, "detail": detail})

    def f(x, unit="", scale=1.0, nd=2):
        return "–" if x is None else f"{x * scale:.{nd}f}{unit}"

    sc = results["scenarios"]
    if "startup" in sc and "median_s" in sc["startup"]:
        s = sc["startup"]["median_s"]
        rr, pp = s.get("rust"), s.get("python")
        rows.append(("startup → first poll (median)", f(rr, " ms", 1000, 0), f(pp, " ms", 1000, 0),
                     f(ratio(pp, rr), "×", 1, 1)))
        check("startup ≥ 50× faster than Python's (first poll at the proxy)",
              None if rr is None or pp is None else rr <= pp / 50,
              f"{f(ratio(pp, rr), '×', 1, 1)}: {f(rr, ' ms', 1000, 0)} vs {f(pp, ' ms', 1000, 0)}")
        o = sc["startup"].get("outside_median_s") or {}
        ro, po = (o.get("rust") or {}), (o.get("python") or {})
        rows.append(("startup from outside: run due at start → container created", f(ro.get("to_create_s"), " ms", 1000, 0),
                     f(po.get("to_create_s"), " ms", 1000, 0), f(ratio(po.get("to_create_s"), ro.get("to_create_s")), "×", 1, 1)))
        rows.append(("  … → its Pending proposal at the proxy", f(ro.get("to_pending_s"), " ms", 1000, 0),
                     f(po.get("to_pending_s"), " ms", 1000, 0), f(ratio(po.get("to_pending_s"), ro.get("to_pending_s")), "×", 1, 1)))
        rc_, pc_ = ro.get("to_create_s"), po.get("to_create_s")
        check("startup from outside ≥ 50× faster than Python's (run due at start → container created)",
              None if rc_ is None or pc_ is None else rc_ <= pc_ / 50,
              f"{f(ratio(pc_, rc_), '×', 1, 1)}: {f(rc_, ' ms', 1000, 0)} vs {f(pc_, ' ms', 1000, 0)}")
        sd = sc["startup"].get("shutdown_median_s") or {}
        rows.append(("shutdown (SIGTERM → exit, idle)", f(sd.get("rust"), " ms", 1000, 0), f(sd.get("python"), " ms", 1000, 0),
                     f(ratio(sd.get("python"), sd.get("rust")), "×", 1, 1)))
    if "idle" in sc and ("rust" in sc["idle"] or "python" in sc["idle"]):
        i = sc["idle"]
        r_, p_ = i.get("rust", {}), i.get("python", {})
        for key, label, scale_, unit, nd in [("rss_bytes", "idle RSS", 1 / MiB, " MiB", 2),
                                             ("cpu_percent", "idle CPU", 1, " %", 2),
                                             ("threads", "idle threads", 1, "", 0),
                                             ("api_calls_per_min", "idle API calls/min", 1, "", 1),
                                             ("dockerd_cpu_percent", "idle dockerd CPU (engine load)", 1, " %", 2)]:
            rows.append((label, f(r_.get(key), unit, scale_, nd), f(p_.get(key), unit, scale_, nd),
                         f(ratio(p_.get(key), r_.get(key)), "×", 1, 1)))
        rr, pp = r_.get("rss_bytes"), p_.get("rss_bytes")
        check("idle RSS ≥ 10× less than Python's and ≤ 10 MiB",
              None if rr is None or pp is None else rr <= pp / 10 and rr <= 10 * MiB,
              f"{f(ratio(pp, rr), '×', 1, 1)}: {f(rr, ' MiB', 1 / MiB, 2)} vs {f(pp, ' MiB', 1 / MiB, 2)}")
    if "throughput" in sc and "median" in sc["throughput"]:
        t = sc["throughput"]["median"]
        fl, r_, p_ = t.get("floor", {}), t.get("rust", {}), t.get("python", {})
        n = sc["throughput"]["runs"]
        lim = sc["throughput"]["limit"]
        rows.append((f"container-only {n} runs, limit {lim}: span (median)", f(r_.get("span_s"), " s"),
                     f(p_.get("span_s"), " s"), f(ratio(p_.get("span_s"), r_.get("span_s")), "×", 1, 1)))
        rows.append(("  engine floor span / rate", f(fl.get("span_s"), " s"), f(fl.get("runs_per_s"), " runs/s", 1, 1), ""))
        rows.append(("  throughput vs floor", f(ratio(r_.get("runs_per_s"), fl.get("runs_per_s")), "×"),
                     f(ratio(p_.get("runs_per_s"), fl.get("runs_per_s")), "×"), ""))
        rows.append(("  slot free → next create (median)", f((r_ or {}).get("slot_pickup_median_s"), " s"),
                     f((p_ or {}).get("slot_pickup_median_s"), " s"), ""))
        rows.append(("  server 503 answers (retried)", f(r_.get("api_503"), "", 1, 0), f(p_.get("api_503"), "", 1, 0), ""))
        rows.append(("  worker CPU per run", f(r_.get("cpu_s_per_run"), " ms", 1000, 1),
                     f(p_.get("cpu_s_per_run"), " ms", 1000, 1),
                     f(ratio(p_.get("cpu_s_per_run"), r_.get("cpu_s_per_run")), "×", 1, 1)))
        rows.append(("  API calls per run (first poll → end)", f(r_.get("api_calls_per_run"), "", 1, 2),
                     f(p_.get("api_calls_per_run"), "", 1, 2),
                     f(ratio(p_.get("api_calls_per_run"), r_.get("api_calls_per_run")), "×", 1, 1)))
        rows.append(("  server CPU per run (Prefect server tree, net of background)",
                     f(r_.get("server_cpu_s_per_run_net"), " ms", 1000, 1), f(p_.get("server_cpu_s_per_run_net"), " ms", 1000, 1),
                     f(ratio(p_.get("server_cpu_s_per_run_net"), r_.get("server_cpu_s_per_run_net")), "×", 1, 2)))
        rows.append(("  server CPU per run (raw)", f(r_.get("server_cpu_s_per_run"), " ms", 1000, 1),
                     f(p_.get("server_cpu_s_per_run"), " ms", 1000, 1),
                     f(ratio(p_.get("server_cpu_s_per_run"), r_.get("server_cpu_s_per_run")), "×", 1, 2)))
        if r_.get("db_cpu_s_per_run") is not None:
            rows.append(("  PostgreSQL CPU per run (net of background)", f(r_.get("db_cpu_s_per_run_net"), " ms", 1000, 1),
                         f(p_.get("db_cpu_s_per_run_net"), " ms", 1000, 1),
                         f(ratio(p_.get("db_cpu_s_per_run_net"), r_.get("db_cpu_s_per_run_net")), "×", 1, 2)))
        rows.append(("  worker peak RSS", f(r_.get("peak_rss_bytes"), " MiB", 1 / MiB, 1),
                     f(p_.get("peak_rss_bytes"), " MiB", 1 / MiB, 1),
                     f(ratio(p_.get("peak_rss_bytes"), r_.get("peak_rss_bytes")), "×", 1, 1)))
        rc, pc = r_.get("cpu_s_per_run"), p_.get("cpu_s_per_run")
        check("worker CPU per container-only run ≥ 20× less than Python's",
              None if rc is None or pc is None else rc <= pc / 20,
              f"{f(ratio(pc, rc), '×', 1, 1)}: {f(rc, ' ms', 1000, 1)} vs {f(pc, ' ms', 1000, 1)}")
        ac = r_.get("api_calls_per_run")
        check("API calls per container-only run ≤ 5", None if ac is None else ac <= 5.0, f"{f(ac, '', 1, 2)}")
        rs, ps = r_.get("server_cpu_s_per_run_net"), p_.get("server_cpu_s_per_run_net")
        check("server CPU per run ≤ 0.6 × Python's", None if rs is None or ps is None else rs <= 0.6 * ps,
              f"{f(ratio(rs, ps), '×', 1, 2)}: {f(rs, ' ms', 1000, 1)} vs {f(ps, ' ms', 1000, 1)} "
              f"(raw {f(r_.get('server_cpu_s_per_run'), ' ms', 1000, 1)} vs {f(p_.get('server_cpu_s_per_run'), ' ms', 1000, 1)})")
        rt = ratio(r_.get("runs_per_s"), fl.get("runs_per_s"))
        check("50 container-only runs, --limit 25: ≥ 0.9 × engine floor", None if rt is None else rt >= 0.9,
              f"{f(rt, '×')} (span {f(r_.get('span_s'), ' s')} vs floor {f(fl.get('span_s'), ' s')}; "
              f"poll interval {sc['throughput']['poll_seconds']} s counts)")
    if "flows" in sc and ("rust" in sc["flows"] or "python" in sc["flows"]):
        fr = sc["flows"]
        for ph in ["scheduled_to_pending", "pending_to_container_started", "container_started_to_running",
                   "running_to_completed", "scheduled_to_completed"]:
            a = fr.get("rust", {}).get("phases", {}).get(ph, {})
            b = fr.get("python", {}).get("phases", {}).get(ph, {}) if isinstance(fr.get("python"), dict) else {}
            rows.append((f"flows ({fr['runs']}, limit {fr['limit']}) {ph} med/p95",
                         f"{f(a.get('median_s'))}/{f(a.get('p95_s'))} s",
                         f"{f(b.get('median_s'))}/{f(b.get('p95_s'))} s",
                         f(ratio(b.get("median_s"), a.get("median_s")), "×", 1, 1)))
        rows.append(("  final states", json.dumps((fr.get("rust") or {}).get("final_states")),
                     json.dumps((fr.get("python") or {}).get("final_states")) if isinstance(fr.get("python"), dict) else "–", ""))
        rows.append(("  server 503 answers (retried)", str((fr.get("rust") or {}).get("api_503")),
                     str((fr.get("python") or {}).get("api_503")) if isinstance(fr.get("python"), dict) else "–", ""))
    if "pickup" in sc and "events" in sc["pickup"]:
        pk = sc["pickup"]
        ev, po = pk["events"], pk.get("polling", {})
        rows.append(("pickup: created → container start, median (events | polling)",
                     f(ev.get("median_s"), " s"), f(po.get("median_s"), " s"), ""))
        rows.append(("pickup: p95 (events | polling)", f(ev.get("p95_s"), " s"), f(po.get("p95_s"), " s"), ""))
        rows.append(("pickup: idle API calls/min (events | polling)", f(ev.get("idle_api_calls_per_min"), "", 1, 1),
                     f(po.get("idle_api_calls_per_min"), "", 1, 1), ""))
        ic, ip = ev.get("idle_api_calls_per_min"), po.get("idle_api_calls_per_min")
        check("fast pickup adds no idle API calls", None if ic is None or ip is None else ic <= ip * 1.1 + 0.5,
              f"{f(ic, '', 1, 1)} vs {f(ip, '', 1, 1)} calls/min")
    if "scale" in sc and "runs" in sc["scale"]:
        s = sc["scale"]
        r_ = s.get("rust") if isinstance(s.get("rust"), dict) else {}
        p_ = s.get("python") if isinstance(s.get("python"), dict) else {}
        n = s["runs"]
        for key, label, scale_, unit, nd in [("worker_start_to_all_running_s", "time to all running", 1, " s", 1),
                                             ("all_running_to_drained_s", "all running → submission drained", 1, " s", 1),
                                             ("rss_bytes", "RSS", 1 / MiB, " MiB", 1),
                                             ("cpu_percent", "CPU", 1, " %", 2),
                                             ("threads", "threads", 1, "", 0),
                                             ("api_calls_per_min", "API calls/min", 1, "", 1),
                                             ("dockerd_cpu_percent", "dockerd CPU (engine load)", 1, " %", 2),
                                             ("api_503", "server 503 answers during the run", 1, "", 0),
                                             ("cleanup_s", "container cleanup (bench)", 1, " s", 1)]:
            rows.append((f"scale {n} running: {label}", f(r_.get(key), unit, scale_, nd),
                         f(p_.get(key), unit, scale_, nd) if p_ else "skipped",
                         f(ratio(p_.get(key), r_.get(key)), "×", 1, 1) if p_ else ""))
        if r_ and "rss_bytes" in r_:
            check(f"{n} concurrent runs: all running", r_.get("containers_running") == n,
                  f"{r_.get('containers_running')}/{n}")
            idle_threads = (sc.get("idle", {}).get("rust") or {}).get("threads")
            check(f"{n} concurrent runs: RSS ≤ 64 MiB", r_["rss_bytes"] <= 64 * MiB, f(r_["rss_bytes"], " MiB", 1 / MiB, 1))
            check(f"{n} concurrent runs: CPU ≤ 1 %", r_["cpu_percent"] <= 1.0, f(r_["cpu_percent"], " %"))
            limit_t = max(32, (idle_threads or 0) + 8)
            check(f"{n} concurrent runs: no thread per run (threads ≤ max(32, idle + 8))",
                  r_["threads_peak"] <= limit_t, f"{r_['threads']} now, {r_['threads_peak']} peak (idle {idle_threads})")
        elif r_ or "error" in s:
            check(f"{n} concurrent runs", False, s.get("error", "failed"))
    w1 = max([len(r[0]) for r in rows] + [10])
    out.append(f"{'figure (' + (results.get('database') or {}).get('kind', '?') + ')':<{w1}}  {'rust':>16}  {'python':>16}  {'py/rust':>8}")
    out.append("-" * (w1 + 46))
    for r in rows:
        out.append(f"{r[0]:<{w1}}  {r[1]:>16}  {r[2]:>16}  {r[3]:>8}")
    out.append("")
    out.append("targets:")
    for c in checks:
        out.append(f"  {c['verdict']:<4}  {c['target']}: {c['detail']}")
    for name, r in sc.items():
        if isinstance(r, dict) and "error" in r:
            out.append(f"  ERROR in {name}: {r['error']}")
    return "\n".join(out), checks


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes: 10 runs, 20 scale containers, 5 s idle, 1 repeat")
    p.add_argument("--pickup-runs", type=int, default=None, help="runs created one by one per pickup mode")
    p.add_argument("--pickup-idle-seconds", type=float, default=None, help="idle window per pickup mode")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {','.join(SCENARIOS)}")
    p.add_argument("--workers", default="rust,python", help="rust,python (scale runs Python only with --python-scale)")
    p.add_argument("--python-scale", action="store_true", help="also run the Python worker at scale (slow)")
    p.add_argument("--repeats", type=int, help="repeats of startup and throughput (default 3)")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="PREFECT_WORKER_QUERY_SECONDS for startup/throughput/flows, both workers (default 1)")
    p.add_argument("--idle-poll-seconds", type=float, default=None,
                   help="PREFECT_WORKER_QUERY_SECONDS for idle/scale (default: unset = Prefect's 10)")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 30)")
    p.add_argument("--throughput-runs", type=int, help="container-only runs (default 50)")
    p.add_argument("--throughput-limit", type=int, default=25, help="--limit and floor parallelism (default 25)")
    p.add_argument("--throughput-timeout", type=float, default=600)
    p.add_argument("--flow-runs", type=int, help="real flow runs (default 20)")
    p.add_argument("--flow-limit", type=int, default=5)
    p.add_argument("--flow-timeout", type=float, default=900)
    p.add_argument("--scale-runs", type=int, help="concurrent sleeping containers (default 1000)")
    p.add_argument("--scale-window", type=float, help="measurement window at scale (default 60)")
    p.add_argument("--scale-timeout", type=float, default=3600)
    p.add_argument("--scale-drain-timeout", type=float, default=300,
                   help="longest wait, once all run, for 5 s without per-run API calls before the window")
    p.add_argument("--scale-job-variables", metavar="JSON",
                   help='extra job variables for the scale deployment, e.g. \'{"stream_output": false}\'')
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite",
                   help="the Prefect server's database: sqlite (its default, in PREFECT_HOME) or postgres (a "
                        "private PostgreSQL cluster in the work dir, default durability settings)")
    p.add_argument("--lean-server", action="store_true",
                   help="turn the Prefect server's background services off (less SQLite contention)")
    p.add_argument("--rust-env", action="append", metavar="K=V", help="extra environment for our worker (repeatable)")
    p.add_argument("--python-env", action="append", metavar="K=V", help="extra environment for the Python worker")
    p.add_argument("--worker-bin", default=str(REPO / "target/release/docker-worker"))
    p.add_argument("--venv", default=os.environ.get("DW_TEST_VENV", str(REPO / ".test-env/venv")))
    p.add_argument("--out", default=str(REPO / "bench/results/latest.json"))
    p.add_argument("--keep-temp", action="store_true", help="keep the work dir (worker and server logs)")
    a = p.parse_args(argv)
    q = a.quick
    for name, full, quick in [("repeats", 3, 1), ("idle_seconds", 30, 5), ("throughput_runs", 50, 10),
                              ("pickup_runs", 15, 3), ("pickup_idle_seconds", 60, 10),
                              ("flow_runs", 20, 5), ("scale_runs", 1000, 20), ("scale_window", 60, 10)]:
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.workers = [s.strip() for s in a.workers.split(",") if s.strip()]
    bad = [s for s in a.only if s not in SCENARIOS] + [w for w in a.workers if w not in WORKERS]
    if bad:
        p.error(f"unknown scenario/worker: {bad}")
    if not Path(a.worker_bin).exists():
        p.error(f"worker binary {a.worker_bin} is missing (cargo build --release)")
    if not (Path(a.venv) / "bin/prefect").exists():
        p.error(f"venv {a.venv} is missing (scripts/test-env.sh)")

    bench = Bench(a)
    bench.results["settings"] = {k: v for k, v in vars(a).items()}

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
    finally:
        bench.teardown()
    bench.results["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    text, checks = report(bench.results)
    bench.results["targets"] = checks
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench.results, indent=2, default=str))
    stamped = out.parent / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if q else ''}.json"
    stamped.write_text(json.dumps(bench.results, indent=2, default=str))
    print(text)
    print(f"\nresults: {out} (and {stamped.name})")
    failed = any("error" in r for r in bench.results["scenarios"].values() if isinstance(r, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
