"""Benchmark of the movie shop: one command, one table.

    venv/dev/bin/python bench/run.py               # the local stack (./scripts/up.sh)
    venv/dev/bin/python bench/run.py --own-stack   # its own services, DBs and queue
    venv/dev/bin/python bench/run.py --own-stack --quick
    venv/dev/bin/python bench/run.py --own-stack --scale     # search at 10k..1M rows
    venv/dev/bin/python bench/run.py --own-stack --profile   # py-spy top costs

Workloads (wrk, 16 connections, 2 threads, 10 s each, the median of --repeat runs):
    W1   GET /api/movies/<random id> via the gateway      (1,000 movies)
    W1d  the same straight to inventory                    (floor of W1)
    W2   GET /api/movies?title=needle via the gateway      (10 of 1,000 match)
    W3   GET /api/movies via the gateway                   (all 1,000 movies)
    W4   POST /api/movies via the gateway
    W5   POST /api/billing via the gateway, billing stopped (confirmed publishes)
    pub  floor of W5: a bare pika publisher with confirms, 16 in flight
    drain  a 100,000-message backlog into orders once billing starts
    ins  floor of drain: bare batched INSERTs (billing's query and batch size)
    1c   one client, GET /api/movies/<id> via the gateway (and direct)
    RSS  VmRSS of each service after the load (VmHWM = peak)

It never runs inside ./scripts/test.sh. Needs wrk (apt-get install wrk), and for
--profile py-spy (python3 -m venv bench/.venv && bench/.venv/bin/pip install py-spy).
Results are also written to bench/results/<time>.json (git-ignored).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import psycopg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PG_SOCKET = "/var/run/postgresql"  # superuser `postgres` over the Unix socket
ORDER = b'{"user_id": 20, "number_of_items": 3, "total_amount": "25.50"}'
BILLING_BATCH = 500  # billing.py's BATCH_SIZE, for the INSERT floor

# Figures of the usual build (2 cores, wrk on the same machine) and the targets.
# A range is compared by its midpoint.
USUAL = {
    "W1": (450, 600),
    "W1d": (1650, 1850),
    "W2": (430, 430),
    "W3": (110, 130),
    "W4": (350, 350),
    "W5": (300, 300),
    "drain": (520, 520),
}
TARGET_X = {"W1": 3, "W2": 3, "W3": 3, "W4": 3, "W5": 5, "drain": 10}
USUAL_SINGLE_P50_MS = 3.0
TARGET_SINGLE_P50_MS = 1.0
TARGET_RSS_MIB = 40
TARGET_GATEWAY_SHARE = 0.60  # W1 >= 60% of W1d


def log(message):
    """Progress on stderr, so stdout holds only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_env_file(path):
    """KEY=VALUE lines of a .env file (no interpolation)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip().strip("'\"")
    return values


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_connect(dbname="postgres"):
    """A superuser connection (autocommit) over the Unix socket."""
    return psycopg.connect(
        host=PG_SOCKET, user="postgres", dbname=dbname, autocommit=True
    )


def rss_kib(pid):
    """(VmRSS, VmHWM, RssAnon, RssFile) of a process in KiB, /proc/<pid>/status.

    RssFile is mostly shared-library pages (libpq, libssl, the interpreter);
    RssAnon is the process's own heap and stacks.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return tuple(fields.get(k, 0) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))


def wait_http(url, expect=200, seconds=30):
    """Poll url until it answers `expect`; raise after `seconds`."""
    host, port, path = _split_url(url)
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == expect:
                return
            last = resp.status
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer {expect} (last: {last})")


def _split_url(url):
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)?", url)
    return match.group(1), int(match.group(2)), match.group(3) or "/"


def http_get(url, timeout=300):
    """GET url; return (status, body bytes, seconds)."""
    host, port, path = _split_url(url)
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, time.monotonic() - started


# --- Databases ---


def ensure_database(name, owner, password, schema):
    """Create role `owner` and database `name` (owned by it) with the schema."""
    with admin_connect() as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)
        ).fetchone():
            conn.execute(f'CREATE ROLE "{owner}" LOGIN')
        conn.execute(f"ALTER ROLE \"{owner}\" PASSWORD '{password}'")
        row = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
            (name,),
        ).fetchone()
        if row and row[0] != owner:  # left by an older run: bench data is disposable
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            row = None
        if not row:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    with admin_connect(name) as conn:
        conn.execute(f'SET ROLE "{owner}"')
        conn.execute(schema.read_text())


def seed_movies(dbname, count=1000):
    """Replace every movie with `count` rows; every 100th title has 'needle'."""
    with admin_connect(dbname) as conn:
        conn.execute("TRUNCATE movies RESTART IDENTITY")
        conn.execute(
            """
            INSERT INTO movies (title, description)
            SELECT CASE WHEN i %% 100 = 0 THEN 'The needle ' || i ELSE 'Movie ' || i END,
                   'A benchmark movie, number ' || i || ', with a description of '
                   || 'about a hundred characters like a real one.'
            FROM generate_series(1, %s) AS i
            """,
            (count,),
        )
        conn.execute("ANALYZE movies")
        return conn.execute("SELECT min(id), max(id) FROM movies").fetchone()


def count_orders(dbname):
    with admin_connect(dbname) as conn:
        return conn.execute("SELECT count(*) FROM orders").fetchone()[0]


# --- RabbitMQ ---


def queue_arguments(queue):
    """As gateway.py and billing.py declare the billing queue."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dead"}


def declare_and_purge(params, queue):
    """Declare the queue pair like the services do; empty both."""
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
        channel.queue_purge(queue)
        channel.queue_purge(f"{queue}.dead")


def queue_depth(params, queue):
    with pika.BlockingConnection(params) as conn:
        return conn.channel().queue_declare(queue, passive=True).method.message_count


def delete_queue(params, queue):
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.queue_delete(queue)
        channel.queue_delete(f"{queue}.dead")


def publish_confirmed(params, queue, body, window, seconds=None, count=None):
    """Publish like the gateway (persistent, mandatory, message_id, confirms).

    An async (SelectConnection) publisher that keeps `window` messages
    unconfirmed; stops after `seconds` or `count` confirmed messages.
    Returns (confirmed, elapsed seconds, nacked).
    """
    state = {"tag": 0, "confirmed": 0, "nacked": 0, "t0": None, "t1": None}
    outstanding = set()
    channel_box = {}

    def sending_done():
        if count is not None and state["tag"] >= count:
            return True
        return seconds is not None and time.monotonic() - state["t0"] >= seconds

    def fill():
        channel = channel_box["channel"]
        while len(outstanding) < window and not sending_done():
            state["tag"] += 1
            outstanding.add(state["tag"])
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=uuid.uuid4().hex,
                timestamp=int(time.time()),
            )
            channel.basic_publish("", queue, body, properties, mandatory=True)
        if not outstanding and sending_done():
            state["t1"] = time.monotonic()
            conn.close()

    def on_confirm(frame):
        method = frame.method
        if method.multiple:
            done = [t for t in outstanding if t <= method.delivery_tag]
        else:
            done = [method.delivery_tag]
        for tag in done:
            outstanding.discard(tag)
        if isinstance(method, pika.spec.Basic.Ack):
            state["confirmed"] += len(done)
        else:
            state["nacked"] += len(done)
        fill()

    def on_declared(_frame):
        state["t0"] = time.monotonic()
        fill()

    def on_channel(channel):
        channel_box["channel"] = channel
        channel.confirm_delivery(
            on_confirm,
            callback=lambda _: channel.queue_declare(
                queue,
                durable=True,
                arguments=queue_arguments(queue),
                callback=on_declared,
            ),
        )

    conn = pika.SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, e: c.ioloop.stop(),
        on_close_callback=lambda c, r: c.ioloop.stop(),
    )
    conn.ioloop.start()
    if state["t0"] is None:
        raise RuntimeError("publisher could not connect to RabbitMQ")
    elapsed = (state["t1"] or time.monotonic()) - state["t0"]
    return state["confirmed"], elapsed, state["nacked"]


# --- Floors without the services ---


def insert_floor(dbname, schema_sql, rows_total, batch=BILLING_BATCH):
    """Rows/s of billing's own INSERT ... unnest, batch by batch, one commit each."""
    query = schema_sql.replace("INSERT INTO orders", "INSERT INTO orders_floor")
    with admin_connect(dbname) as conn:
        conn.execute("DROP TABLE IF EXISTS orders_floor")
        conn.execute("CREATE TABLE orders_floor (LIKE orders INCLUDING ALL)")
    conn = psycopg.connect(host=PG_SOCKET, user="postgres", dbname=dbname)
    try:
        started = time.monotonic()
        done = 0
        while done < rows_total:
            n = min(batch, rows_total - done)
            with conn.transaction():
                conn.execute(
                    query,
                    {
                        "user_ids": [20] * n,
                        "numbers_of_items": [3] * n,
                        "total_amounts": ["25.50"] * n,
                        "message_ids": [uuid.uuid4().hex for _ in range(n)],
                    },
                ).fetchall()
            done += n
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    with admin_connect(dbname) as conn:
        conn.execute("DROP TABLE orders_floor")
    return done / elapsed


# --- The stack under test ---


class OwnStack:
    """Three services on free ports against bench_movies, bench_billing, bench_queue."""

    def __init__(
        self, movies_db="bench_movies", billing_db="bench_billing", queue="bench_queue"
    ):
        self.movies_db, self.billing_db, self.queue = movies_db, billing_db, queue
        # The services' own roles and RabbitMQ user, from .env (./scripts/up.sh
        # creates the RabbitMQ user); the bench databases are owned by them.
        env = {**read_env_file(REPO / ".env"), **os.environ}
        self.role = env["INVENTORY_DB_USER"], env["INVENTORY_DB_PASSWORD"]
        self.billing_role = env["BILLING_DB_USER"], env["BILLING_DB_PASSWORD"]
        self.mq_user = env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"]
        self.ports = {"inventory": free_port(), "gateway": free_port()}
        self.gateway_url = f"http://127.0.0.1:{self.ports['gateway']}"
        self.inventory_url = f"http://127.0.0.1:{self.ports['inventory']}"
        self.amqp = pika.ConnectionParameters(
            "127.0.0.1",
            5672,
            credentials=pika.PlainCredentials(*self.mq_user),
            heartbeat=60,
            connection_attempts=10,
            retry_delay=1,
        )
        self.procs = {}
        (RESULTS / "logs").mkdir(parents=True, exist_ok=True)

    def env(self):
        env = dict(os.environ)
        env.update(
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.ports["gateway"]),
            INVENTORY_HOST="127.0.0.1",
            INVENTORY_PORT=str(self.ports["inventory"]),
            INVENTORY_TIMEOUT="10",
            INVENTORY_DB_HOST="127.0.0.1",
            INVENTORY_DB_PORT="5432",
            INVENTORY_DB_NAME=self.movies_db,
            INVENTORY_DB_USER=self.role[0],
            INVENTORY_DB_PASSWORD=self.role[1],
            BILLING_HOST="127.0.0.1",
            BILLING_DB_HOST="127.0.0.1",
            BILLING_DB_PORT="5432",
            BILLING_DB_NAME=self.billing_db,
            BILLING_DB_USER=self.billing_role[0],
            BILLING_DB_PASSWORD=self.billing_role[1],
            RABBITMQ_HOST="127.0.0.1",
            RABBITMQ_PORT="5672",
            RABBITMQ_USER=self.mq_user[0],
            RABBITMQ_PASSWORD=self.mq_user[1],
            RABBITMQ_QUEUE=self.queue,
            PYTHONUNBUFFERED="1",  # as PM2 runs them (ecosystem.config.js)
            MALLOC_ARENA_MAX="2",
        )
        return env

    def prepare(self):
        ensure_database(
            self.movies_db, *self.role, REPO / "sql" / "inventory_schema.sql"
        )
        ensure_database(
            self.billing_db, *self.billing_role, REPO / "sql" / "billing_schema.sql"
        )

    def start(self, service):
        python = REPO / "venv" / service / "bin" / "python"
        if not python.exists():
            python = REPO / "venv" / "dev" / "bin" / "python"
        with open(RESULTS / "logs" / f"{service}.log", "ab") as out:
            self.procs[service] = subprocess.Popen(
                [str(python), str(REPO / f"{service}.py")],
                cwd=REPO,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self, service):
        proc = self.procs.pop(service, None)
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def up(self):
        self.prepare()
        for service in ("inventory", "billing", "gateway"):
            self.start(service)
        wait_http(self.inventory_url + "/api/movies?limit=1")
        wait_http(self.gateway_url + "/health")

    def down(self):
        for service in list(self.procs):
            self.stop(service)

    def stop_billing(self):
        self.stop("billing")

    def start_billing(self):
        self.start("billing")

    def pids(self):
        return {name: proc.pid for name, proc in self.procs.items()}


PM2_APPS = {
    "inventory": "inventory_app",
    "billing": "billing_app",
    "gateway": "api_gateway",
}


class LocalStack:
    """The PM2 stack from ./scripts/up.sh, names from .env, hosts 127.0.0.1."""

    def __init__(self):
        env = {**read_env_file(REPO / ".env"), **os.environ}
        self.movies_db = env["INVENTORY_DB_NAME"]
        self.billing_db = env["BILLING_DB_NAME"]
        self.queue = env["RABBITMQ_QUEUE"]
        self.gateway_url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        self.inventory_url = f"http://127.0.0.1:{env['INVENTORY_PORT']}"
        self.amqp = pika.ConnectionParameters(
            "127.0.0.1",
            int(env["RABBITMQ_PORT"]),
            credentials=pika.PlainCredentials(
                env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"]
            ),
            heartbeat=60,
            connection_attempts=10,
            retry_delay=1,
        )
        self._billing_stopped = False

    def up(self):
        try:
            wait_http(self.gateway_url + "/health", seconds=5)
        except RuntimeError as exc:
            sys.exit(
                f"bench: the local stack is not up ({exc}); run ./scripts/up.sh "
                "or use --own-stack"
            )

    def _pm2(self, *args):
        subprocess.run(["pm2", *args], check=True, stdout=subprocess.DEVNULL)

    def stop_billing(self):
        self._billing_stopped = True
        self._pm2("stop", PM2_APPS["billing"])

    def start_billing(self):
        self._pm2("start", PM2_APPS["billing"])
        self._billing_stopped = False

    def down(self):
        if self._billing_stopped:
            self.start_billing()

    def pids(self):
        apps = json.loads(
            subprocess.run(
                ["pm2", "jlist"], check=True, capture_output=True, text=True
            ).stdout
        )
        by_name = {app["name"]: app.get("pid") for app in apps}
        return {
            svc: by_name.get(name)
            for svc, name in PM2_APPS.items()
            if by_name.get(name)
        }


# --- wrk ---


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


CPU_PIDS = {}  # service -> pid whose CPU time each wrk run reports


def wrk(url, script, seconds, connections=16, threads=2, env=None):
    """Run wrk with a script from bench/; return its BENCH_RESULT as a dict.

    Also the CPU time each service in CPU_PIDS used per request (ms) and how
    busy the whole machine was during the run.
    """
    cpu_before = {
        svc: cpu_seconds(pid)
        for svc, pid in CPU_PIDS.items()
        if Path(f"/proc/{pid}").exists()
    }
    busy_before = system_busy()
    run_env = {**os.environ, "BENCH_LUA_DIR": str(BENCH), **(env or {})}
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(BENCH / script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env, check=True)
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    result = json.loads(match.group(1))
    # Successful responses per second: a fast 503 is not throughput.
    result["rps"] = (result["requests"] - result["status"]) / (
        result["duration_us"] / 1e6
    )
    busy_after = system_busy()
    result["machine_busy"] = (busy_after[0] - busy_before[0]) / max(
        1, busy_after[1] - busy_before[1]
    )
    result["cpu_ms_per_req"] = {
        svc: round(
            1000 * (cpu_seconds(CPU_PIDS[svc]) - before) / max(1, result["requests"]), 3
        )
        for svc, before in cpu_before.items()
        if Path(f"/proc/{CPU_PIDS[svc]}").exists()
    }
    result["errors"] = sum(
        result[k] for k in ("connect", "read", "write", "status", "timeout")
    )
    return result


def median_run(runs):
    """The run with the median req/s (its own latencies), plus every req/s.

    Runs without errors are preferred: on a shared machine another session may
    restart a dependency mid-run. `errors` is the chosen run's; `errors_all`
    adds up every run's.
    """
    clean = [r for r in runs if not r["errors"]] or runs
    ordered = sorted(clean, key=lambda r: r["rps"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_rps"] = [round(r["rps"]) for r in runs]
    chosen["errors_all"] = sum(r["errors"] for r in runs)
    return chosen


# --- The run ---


def run(args):
    RESULTS.mkdir(exist_ok=True)
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing: apt-get install -y wrk")
    results = {
        "mode": "own-stack" if args.own_stack else "local-stack",
        "args": vars(args),
        "machine": machine(),
    }
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save():
        # Saved after each part, so that a failure later keeps what was measured.
        path.write_text(json.dumps(results, indent=2))

    if not args.scale_only:
        stack = OwnStack() if args.own_stack else LocalStack()
        try:
            log(f"bringing up / checking the {results['mode']}")
            stack.up()
            log(f"seeding 1,000 movies into {stack.movies_db}")
            id_min, id_max = seed_movies(stack.movies_db)
            CPU_PIDS.clear()
            CPU_PIDS.update(
                (svc, pid) for svc, pid in stack.pids().items() if svc != "billing"
            )
            declare_and_purge(stack.amqp, stack.queue)
            with admin_connect(stack.billing_db) as conn:
                conn.execute("TRUNCATE orders")
            results["workloads"] = workloads(args, stack, id_min, id_max)
            save()
            results["drain"] = drain(args, stack)
            results["rss"] = {svc: rss_kib(pid) for svc, pid in stack.pids().items()}
            save()
            if args.profile:
                results["profile"] = profile(args, stack, id_min, id_max)
                save()
        finally:
            stack.down()
    if args.scale or args.scale_only:
        results["scale"] = scale(args)
        save()
    print_table(results)
    log(f"saved {path.relative_to(REPO)}")


def workloads(args, stack, id_min, id_max):
    d, n = args.duration, args.repeat
    ids = {"BENCH_ID_MIN": str(id_min), "BENCH_ID_MAX": str(id_max)}
    gw, inv = stack.gateway_url, stack.inventory_url
    out = {}
    # Warm up both paths (pool connections, prepared statements).
    wrk(gw + "/", "get_random.lua", 2, env=ids)
    wrk(inv + "/", "get_random.lua", 1, env=ids)
    w1, w1d = [], []
    for i in range(n):  # W1 and its floor alternate so that both see the same noise
        log(f"W1 / W1d run {i + 1}/{n}")
        w1.append(wrk(gw + "/", "get_random.lua", d, env=ids))
        w1d.append(wrk(inv + "/", "get_random.lua", d, env=ids))
    out["W1"], out["W1d"] = median_run(w1), median_run(w1d)
    out["W1"]["share_of_direct"] = statistics.median(
        a["rps"] / b["rps"] for a, b in zip(w1, w1d)
    )
    log("W2 search ?title=needle")
    out["W2"] = median_run(
        [wrk(gw + "/api/movies?title=needle", "get_fixed.lua", d) for _ in range(n)]
    )
    log("W3 list all")
    out["W3"] = median_run(
        [wrk(gw + "/api/movies", "get_fixed.lua", d) for _ in range(n)]
    )
    log("single client via gateway and direct")
    single = {"BENCH_ID_MIN": str(id_min), "BENCH_ID_MAX": str(id_max)}
    out["1c"] = median_run(
        [
            wrk(
                gw + "/",
                "get_random.lua",
                args.single_seconds,
                connections=1,
                threads=1,
                env=single,
            )
            for _ in range(n)
        ]
    )
    out["1c-direct"] = median_run(
        [
            wrk(
                inv + "/",
                "get_random.lua",
                args.single_seconds,
                connections=1,
                threads=1,
                env=single,
            )
            for _ in range(n)
        ]
    )
    log("W4 POST /api/movies")
    out["W4"] = median_run(
        [wrk(gw + "/api/movies", "post_movie.lua", d) for _ in range(n)]
    )
    log("W5 POST /api/billing (billing stopped) and the bare publisher floor")
    stack.stop_billing()
    declare_and_purge(stack.amqp, stack.queue)
    w5, pub = [], []
    floor_queue = f"{stack.queue}_floor"
    body = ORDER
    for i in range(n):
        w5.append(
            wrk(
                gw + "/api/billing",
                "post_billing.lua",
                d,
                env={"BENCH_ORDER": body.decode()},
            )
        )
        confirmed, elapsed, nacked = publish_confirmed(
            stack.amqp, floor_queue, body, window=args.connections, seconds=d
        )
        pub.append(
            {
                "rps": confirmed / elapsed,
                "requests": confirmed,
                "errors": nacked,
                "p50_us": None,
                "p99_us": None,
            }
        )
        declare_and_purge(stack.amqp, floor_queue)
    delete_queue(stack.amqp, floor_queue)
    out["W5"] = median_run(w5)
    out["pub"] = median_run(pub)
    return out


def drain(args, stack):
    """Top the queue up to the backlog, start billing, time until all rows exist."""
    target = args.backlog
    depth = queue_depth(stack.amqp, stack.queue)
    log(f"backlog: {depth} messages from W5, publishing {max(0, target - depth)} more")
    if depth < target:
        publish_confirmed(
            stack.amqp, stack.queue, ORDER, window=2000, count=target - depth
        )
    depth = queue_depth(stack.amqp, stack.queue)
    log(f"starting billing on a backlog of {depth}")
    started = time.monotonic()
    stack.start_billing()
    first = None
    rows = 0
    deadline = started + args.drain_timeout
    while time.monotonic() < deadline:
        rows = count_orders(stack.billing_db)
        if rows and first is None:
            first = time.monotonic()
        if rows >= depth:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    result = {
        "backlog": depth,
        "rows": rows,
        "seconds": elapsed,
        "rps": rows / elapsed,
        "rps_after_first_row": rows / (time.monotonic() - first) if first else 0,
        "complete": rows >= depth,
    }
    log(f"drain: {rows}/{depth} rows in {elapsed:.1f}s = {result['rps']:.0f} msg/s")
    log(f"INSERT floor: {depth} rows in batches of {BILLING_BATCH}")
    queries = (REPO / "sql" / "billing_queries.sql").read_text()
    insert_sql = queries.split("-- name: insert_orders", 1)[1]
    insert_sql = (
        "\n".join(l for l in insert_sql.splitlines() if not l.startswith("--"))
        .strip()
        .rstrip(";")
    )
    result["floor_rps"] = insert_floor(stack.billing_db, insert_sql, depth)
    return result


# --- Scale (--scale) ---


def scale(args):
    """Search p50 at 10k/100k/1M rows; inventory RSS listing all at 10k and 1M."""
    stack = OwnStack(
        movies_db="bench_scale", billing_db="bench_billing", queue="bench_queue"
    )
    stack.prepare()
    ensure_database("bench_scale", *stack.role, REPO / "sql" / "inventory_schema.sql")
    out = {}
    try:
        for rows in args.scale_rows:
            log(f"scale: seeding {rows:,} movies with generate_series")
            retry(lambda rows=rows: seed_scale("bench_scale", rows))
            stack.start("inventory")
            wait_http(stack.inventory_url + "/api/movies?limit=1")
            url = stack.inventory_url + "/api/movies?title=needle"
            wrk(url, "get_fixed.lua", 2, connections=1, threads=1)
            runs = [
                wrk(url, "get_fixed.lua", args.single_seconds, connections=1, threads=1)
                for _ in range(args.repeat)
            ]
            entry = {"search": median_run(runs), "plan": search_plan("bench_scale")}
            if rows in (min(args.scale_rows), max(args.scale_rows)):
                pid = stack.procs["inventory"].pid
                before = rss_kib(pid)
                status, body, seconds = http_get(stack.inventory_url + "/api/movies")
                after = rss_kib(pid)
                entry["list_all"] = {
                    "status": status,
                    "bytes": len(body),
                    "seconds": seconds,
                    "rss_before_kib": before[0],
                    "rss_after_kib": after[0],
                    "hwm_kib": after[1],
                }
            out[str(rows)] = entry
            log(
                f"scale {rows:,}: search p50 {entry['search']['p50_us'] / 1000:.2f} ms"
                + (
                    f", list all RSS {entry['list_all']['rss_after_kib'] / 1024:.0f} MiB"
                    if "list_all" in entry
                    else ""
                )
            )
            stack.stop("inventory")
    finally:
        stack.down()
    return out


def retry(action, attempts=3):
    """Run action again after a database error (the machine is shared)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except psycopg.OperationalError as exc:
            if attempt == attempts:
                raise
            log(f"database error ({exc}); retrying in 3 s")
            time.sleep(3)


def seed_scale(dbname, rows):
    """`rows` movies with hex titles; exactly 10 contain 'needle'."""
    step = rows // 10
    with admin_connect(dbname) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("TRUNCATE movies RESTART IDENTITY")
        conn.execute("DROP INDEX IF EXISTS movies_title_trgm")
        conn.execute(
            """
            INSERT INTO movies (title, description)
            SELECT CASE WHEN i %% %(step)s = 0 THEN 'The needle ' || md5(i::text)
                        ELSE 'Movie ' || md5(i::text) END,
                   'Scale row ' || i
            FROM generate_series(1, %(rows)s) AS i
            """,
            {"rows": rows, "step": step},
        )
        conn.execute((REPO / "sql" / "inventory_schema.sql").read_text())
        conn.execute("VACUUM ANALYZE movies")


def search_plan(dbname):
    """The plan of inventory's search query with the pattern bound (custom plan)."""
    queries = (REPO / "sql" / "inventory_queries.sql").read_text()
    # The title search's own query if there is one, else the list query.
    for name in ("page_movies_by_title", "page_movies", "stream_movies"):
        if f"-- name: {name}" in queries:
            break
    sql = queries.split(f"-- name: {name}", 1)[1].split("-- name:", 1)[0]
    sql = "\n".join(ln for ln in sql.splitlines() if not ln.startswith("--"))
    sql = sql.strip().rstrip(";")
    params = {"pattern": "%needle%", "limit": None, "offset": 0, "after": 0}
    params["size"] = 2000
    with admin_connect(dbname) as conn:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql, params
        ).fetchall()
    return [f"{name}: "] + [row[0] for row in plan]


# --- Profile (--profile) ---


def profile(args, stack, id_min, id_max):
    """py-spy the gateway and inventory under W1 and W4, billing during a drain."""
    spy = shutil.which("py-spy") or str(BENCH / ".venv" / "bin" / "py-spy")
    if not Path(spy).exists():
        log(
            "py-spy not found: python3 -m venv bench/.venv && "
            "bench/.venv/bin/pip install py-spy"
        )
        return {}
    seconds = max(args.duration, 5)
    ids = {"BENCH_ID_MIN": str(id_min), "BENCH_ID_MAX": str(id_max)}
    out = {}
    for name, path, script in (
        ("W1", "/", "get_random.lua"),
        ("W4", "/api/movies", "post_movie.lua"),
    ):
        log(f"profiling gateway and inventory under {name}")
        pids = stack.pids()
        spies = {
            svc: start_spy(spy, pids[svc], seconds, f"{name}-{svc}")
            for svc in ("gateway", "inventory")
        }
        wrk(stack.gateway_url + path, script, seconds, env=ids)
        for svc, (proc, path_out) in spies.items():
            proc.wait()
            out[f"{name}-{svc}"] = top_costs(path_out)
    log("profiling billing during a drain")
    stack.stop_billing()
    declare_and_purge(stack.amqp, stack.queue)
    publish_confirmed(
        stack.amqp, stack.queue, ORDER, window=2000, count=args.profile_backlog
    )
    stack.start_billing()
    time.sleep(1.0)
    proc, path_out = start_spy(spy, stack.pids()["billing"], seconds, "drain-billing")
    proc.wait()
    out["drain-billing"] = top_costs(path_out)
    return out


def start_spy(spy, pid, seconds, label):
    path = RESULTS / f"profile-{label}.txt"
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(path),
            "--nonblocking",
            "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, path


def top_costs(path, top=15):
    """Self and inclusive sample shares per function from py-spy's raw output."""
    self_count, incl_count, total = {}, {}, 0
    if not path.exists():
        return {"error": "no samples (py-spy failed: ptrace allowed?)"}
    for line in path.read_text().splitlines():
        stack_text, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [_frame_name(f) for f in stack_text.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += n
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
        for f in set(frames):
            incl_count[f] = incl_count.get(f, 0) + n

    def share(counts):
        return [
            (f, round(100 * c / total, 1))
            for f, c in sorted(counts.items(), key=lambda kv: -kv[1])
            if not f.endswith(BOILERPLATE)
        ][:top]

    return {"samples": total, "self": share(self_count), "inclusive": share(incl_count)}


# Frames that every request passes through; left out of the inclusive list.
BOILERPLATE = (
    "(threading.py)",
    "(socketserver.py)",
    "handle (server.py)",
    "handle_one_request (server.py)",
    "handle_one_request (gateway.py)",
    "handle_one_request (inventory.py)",
    "process_request_thread (gateway.py)",
    "process_request_thread (inventory.py)",
    "<module> (billing.py)",
    "main (billing.py)",
    "run (billing.py)",
)


def _frame_name(frame):
    """'func (path/file.py:12)' -> 'func (file.py)'; drop process/thread frames."""
    match = re.match(r"(.+?) \((.+?)(?::\d+)?\)$", frame.strip())
    if not match:
        return None
    return f"{match.group(1)} ({Path(match.group(2)).name})"


# --- Report ---


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def _mid(name):
    low, high = USUAL[name]
    return (low + high) / 2


def _ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def _cpu(result):
    """'gw 0.41 + inv 0.30, 97%': service CPU per request and machine busy share."""
    if not result or not result.get("cpu_ms_per_req"):
        return "-"
    short = {"gateway": "gw", "inventory": "inv"}
    parts = [
        f"{short.get(k, k)} {v:.2f}"
        for k, v in sorted(result["cpu_ms_per_req"].items())
    ]
    return " + ".join(parts) + f", {result['machine_busy']:.0%}"


def print_table(results):
    """Print the main table (if measured), RSS, scale and profile parts."""
    if "workloads" in results and "drain" in results:
        _print_main(results)
    if results.get("rss"):
        _print_rss(results)
    if results.get("scale"):
        _print_scale(results)
    if results.get("profile"):
        _print_profile(results)


def _err(result):
    """Errors of the reported run, and of all runs when they differ."""
    total = result.get("errors_all", result["errors"])
    if total != result["errors"]:
        return f"{result['errors']} ({total} all runs)"
    return str(result["errors"])


def _print_main(results):
    w = results["workloads"]
    rows = []

    def add(
        label, rps, p50, p99, errors, usual, x_target, floor_label, floor_rps, cpu=None
    ):
        ratio = f"{rps / usual:.2f}x" if usual else "-"
        verdict = "-"
        if usual and x_target:
            verdict = "MET" if rps >= usual * x_target else "missed"
            verdict += f" (>= {x_target}x)"
        floor = f"{rps / floor_rps:.0%} of {floor_label}" if floor_rps else "-"
        rows.append(
            (
                label,
                f"{rps:,.0f}",
                _ms(p50),
                _ms(p99),
                str(errors),
                f"{usual:,.0f}" if usual else "-",
                ratio,
                verdict,
                floor,
                _cpu(cpu),
            )
        )

    def add_wrk(key, label, floor_key=None):
        """A row for wrk (or publisher) workload `key`, against its floor if any."""
        r = w[key]
        add(
            label,
            r["rps"],
            r.get("p50_us"),
            r.get("p99_us"),
            _err(r),
            _mid(key) if key in USUAL else None,
            TARGET_X.get(key),
            floor_key,
            w[floor_key]["rps"] if floor_key else None,
            r,
        )

    add_wrk("W1", "W1 GET /api/movies/<id> gw", "W1d")
    add_wrk("W1d", "W1d same, direct inventory")
    add_wrk("W2", "W2 GET ?title=needle gw")
    add_wrk("W3", "W3 GET all 1,000 gw")
    add_wrk("W4", "W4 POST /api/movies gw")
    add_wrk("W5", "W5 POST /api/billing gw", "pub")
    add_wrk("pub", "pub bare publisher, confirms")
    d = results["drain"]
    add(
        f"drain {d['backlog']:,} msgs -> orders",
        d["rps"],
        None,
        None,
        0 if d["complete"] else d["backlog"] - d["rows"],
        _mid("drain"),
        TARGET_X["drain"],
        "ins",
        d["floor_rps"],
    )
    add(
        "ins bare batched INSERT", d["floor_rps"], None, None, 0, None, None, None, None
    )
    for key, label in (
        ("1c", "1 client GET <id> gw"),
        ("1c-direct", "1 client direct"),
    ):
        r = w[key]
        ok = r["p50_us"] / 1000 <= TARGET_SINGLE_P50_MS
        verdict = ("MET" if ok else "missed") + " (p50 <= 1 ms)" if key == "1c" else "-"
        ratio = (
            f"{USUAL_SINGLE_P50_MS / (r['p50_us'] / 1000):.1f}x faster"
            if key == "1c"
            else "-"
        )
        rows.append(
            (
                label,
                f"{r['rps']:,.0f}",
                _ms(r["p50_us"]),
                _ms(r["p99_us"]),
                _err(r),
                "p50 3 ms" if key == "1c" else "-",
                ratio,
                verdict,
                "-",
                _cpu(r),
            )
        )
    head = (
        "workload",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "usual",
        "x usual",
        "target",
        "vs floor",
        "CPU ms/req gw+inv, busy",
    )
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join(h.ljust(widths[i]) for i, h in enumerate(head))
    print(
        f"\nmode: {results['mode']}, wrk -t2 -c16 -d{results['args']['duration']}s, "
        f"median of {results['args']['repeat']} runs; {results['machine']['nproc']} "
        f"cores, {results['machine']['cpu']}"
    )
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)))
    print(
        f"\nW1 gateway / direct (same run, median of pairs): "
        f"{w['W1']['share_of_direct']:.0%} (target >= 60%: "
        f"{'MET' if w['W1']['share_of_direct'] >= TARGET_GATEWAY_SHARE else 'missed'})"
    )
    print(
        "req/s of every run: "
        + ", ".join(f"{k} {v.get('all_rps')}" for k, v in w.items() if v.get("all_rps"))
    )


def _print_rss(results):
    print("\nRSS after the load (VmRSS / peak VmHWM), target <= 40 MiB each:")
    for svc, values in sorted(results["rss"].items()):
        rss, hwm = values[:2]
        verdict = "MET" if rss / 1024 <= TARGET_RSS_MIB else "missed"
        extra = ""
        if len(values) >= 4:
            extra = f"  (anon {values[2] / 1024:.1f}, file {values[3] / 1024:.1f})"
        print(
            f"  {svc:10s} {rss / 1024:6.1f} MiB / {hwm / 1024:6.1f} MiB  {verdict}{extra}"
        )


def _print_scale(results):
    print("\nScale (own inventory, one client, ?title=needle, 10 matches):")
    for rows_n, entry in results["scale"].items():
        s = entry["search"]
        text = (
            f"  {int(rows_n):>9,} movies: p50 {_ms(s['p50_us'])} ms, "
            f"p99 {_ms(s['p99_us'])} ms, {s['rps']:,.0f} req/s"
        )
        if "list_all" in entry:
            la = entry["list_all"]
            text += (
                f"; GET all: {la['bytes'] / 2**20:.1f} MiB in "
                f"{la['seconds']:.2f} s, inventory RSS "
                f"{la['rss_before_kib'] / 1024:.0f} -> "
                f"{la['rss_after_kib'] / 1024:.0f} MiB "
                f"(peak {la['hwm_kib'] / 1024:.0f})"
            )
        print(text)


def _print_profile(results):
    print("\nProfile (py-spy --gil: share of samples where a thread holds the GIL):")
    for label, prof in results["profile"].items():
        if "self" not in prof:
            print(f"  {label}: {prof}")
            continue
        print(
            f"  {label} ({prof['samples']} samples) self: "
            + "; ".join(f"{f} {p}%" for f, p in prof["self"][:8])
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--own-stack",
        action="store_true",
        help="start own services on free ports (bench_* DBs and queue)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s runs, 1 repeat, a 10,000-message backlog",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="also search latency at 10k/100k/1M movies (slow)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy the services under W1, W4 and a drain",
    )
    parser.add_argument("--duration", type=int, help="seconds per wrk run (10)")
    parser.add_argument("--repeat", type=int, help="runs per workload (3)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--backlog", type=int, help="drain backlog (100,000)")
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--single-seconds", type=int)
    parser.add_argument("--profile-backlog", type=int, default=30_000)
    parser.add_argument(
        "--scale-rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000]
    )
    parser.add_argument(
        "--scale-only", action="store_true", help="only the --scale part"
    )
    parser.add_argument(
        "--report",
        metavar="JSON",
        help="only print the table of a saved bench/results/*.json",
    )
    args = parser.parse_args()
    if args.report:
        print_table(json.loads(Path(args.report).read_text()))
        return
    quick = args.quick
    for name, full, short in (
        ("duration", 10, 3),
        ("repeat", 3, 1),
        ("backlog", 100_000, 10_000),
        ("single_seconds", 5, 2),
    ):
        if getattr(args, name) is None:  # --quick only changes the defaults
            setattr(args, name, short if quick else full)
    run(args)


if __name__ == "__main__":
    main()
