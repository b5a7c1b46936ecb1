"""Benchmark of the movie shop: each workload beside a floor measured in the same run.

    venv/dev/bin/python bench/run.py                      # the stack of ./scripts/up.sh
    venv/dev/bin/python bench/run.py --own-stack          # its own services, DBs, queue
    venv/dev/bin/python bench/run.py --own-stack --quick  # 3 s runs, 1 repeat (~1 min)

Rows (wrk, 16 connections, 2 threads, median of --repeat runs) and the floor each
is judged against, measured in the same run on the same machine:
    W1     GET /api/movies/<id> via the gateway     floor: W1d, inventory direct
    W1d    the same straight to inventory           floor: bare GET
    W2     GET /api/movies?title=needle (gateway)   floor: bare GET
    W3     GET /api/movies, 1,000 movies (gateway)  floor: bare GET of W3's size
    W4     POST /api/movies (gateway)               floor: bare POST
    W5     POST /api/billing, billing stopped       floor: bare pika publisher
    1c     W1 with one client                       floor: bare GET, one client
    drain  a queued backlog into orders             floor: bare batched INSERTs
"bare" is bench/bare_server.py, a stdlib ThreadingHTTPServer that only answers:
what http.server itself costs on this machine today. No figure of another run
or another program enters the table: on a shared machine they differ by 2x
from one day to the next.

Prints the table; writes bench/results/<time>.json and .svg (git-ignored) and,
with --svg PATH, the chart there too. Needs wrk (apt-get install wrk).
"""

import argparse
import html
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import psycopg
from dotenv import dotenv_values

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
ORDER = b'{"user_id": 20, "number_of_items": 3, "total_amount": "25.50"}'
GUEST = "guest"  # RabbitMQ's own user and password, admitted from loopback only
APPS = {
    "inventory": "inventory_app",
    "billing": "billing_app",
    "gateway": "api_gateway",
}


def log(message):
    """Progress on stderr, so that stdout holds only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin(dbname="postgres"):
    """A superuser connection over the Unix socket, autocommit."""
    return psycopg.connect(user="postgres", dbname=dbname, autocommit=True)


def http_get(url, timeout=60):
    """(status, body) of a GET, or (None, b"") if nothing answers."""
    host, port, path = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url).groups()
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return None, b""


def wait_http(url, seconds=30):
    """Poll url until it answers 200."""
    deadline = time.monotonic() + seconds
    while http_get(url, 2)[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer 200")
        time.sleep(0.2)


def pm2(*args):
    """Run root's pm2; its output."""
    return subprocess.run(["pm2", *args], check=True, capture_output=True).stdout


# --- Data ---


def ensure_database(name, owner, password, schema):
    """Role owner with password, database name owned by it, schema applied."""
    with admin() as conn:
        find_role = "SELECT 1 FROM pg_roles WHERE rolname = %s"
        if not conn.execute(find_role, (owner,)).fetchone():
            conn.execute(f'CREATE ROLE "{owner}" LOGIN')
        conn.execute(f"ALTER ROLE \"{owner}\" PASSWORD '{password}'")
        find_db = "SELECT 1 FROM pg_database WHERE datname = %s"
        if not conn.execute(find_db, (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    with admin(name) as conn:
        conn.execute(f'SET ROLE "{owner}"')
        conn.execute(schema.read_text())


def seed_movies(dbname, count=1000):
    """Replace every movie with count rows; every 100th title has 'needle'."""
    with admin(dbname) as conn:
        conn.execute("TRUNCATE movies RESTART IDENTITY")
        conn.execute(
            """INSERT INTO movies (title, description)
               SELECT CASE WHEN i %% 100 = 0 THEN 'The needle ' || i
                           ELSE 'Movie ' || i END,
                      'A benchmark movie, number ' || i || ', with a description '
                      || 'of about a hundred characters like a real one.'
               FROM generate_series(1, %s) AS i""",
            (count,),
        )
        conn.execute("ANALYZE movies")
        return conn.execute("SELECT min(id), max(id) FROM movies").fetchone()


def insert_floor(dbname, rows):
    """Rows/s of billing's own insert_orders, a batch a statement, one commit each."""
    sys.path.insert(0, str(REPO))
    from billing import BATCH_SIZE  # the one source, not a copy

    sql = (REPO / "sql" / "billing_queries.sql").read_text()
    sql = sql.split("-- name: insert_orders", 1)[1].split("-- name:", 1)[0]
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    sql = sql.strip().rstrip(";").replace("INTO orders", "INTO orders_floor")
    with admin(dbname) as conn:
        conn.execute("DROP TABLE IF EXISTS orders_floor")
        conn.execute("CREATE TABLE orders_floor (LIKE orders INCLUDING ALL)")
        started, done = time.monotonic(), 0
        while done < rows:
            n = min(BATCH_SIZE, rows - done)
            batch = {"user_ids": [20] * n, "numbers_of_items": [3] * n}
            batch["total_amounts"] = ["25.50"] * n
            batch["message_ids"] = [uuid.uuid4().hex for _ in range(n)]
            with conn.transaction():
                conn.execute(sql, batch).fetchall()
            done += n
        elapsed = time.monotonic() - started
        conn.execute("DROP TABLE orders_floor")
    return done / elapsed


# --- RabbitMQ ---


def declare_queue(params, queue, purge=True):
    """Declare the queue pair as the services do; empty it or return its depth."""
    sys.path.insert(0, str(REPO))
    from billing import queue_arguments  # the one source, not a copy

    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.queue_declare(f"{queue}.dead", durable=True)
        ok = channel.queue_declare(
            queue, durable=True, arguments=queue_arguments(queue)
        )
        if purge:
            channel.queue_purge(queue)
        return ok.method.message_count


def delete_queue(params, queue):
    """Remove the queue pair."""
    with pika.BlockingConnection(params) as conn:
        conn.channel().queue_delete(queue)
        conn.channel().queue_delete(f"{queue}.dead")


def publish_confirmed(params, queue, window, seconds=None, count=None):
    """Confirmed messages/s of ORDER published as the gateway does (persistent,
    mandatory, a message_id), `window` unconfirmed, for seconds or count."""
    state = {"sent": 0, "acked": 0, "t0": None, "t1": None}
    pending = set()

    def done_sending():
        if count is not None:
            return state["sent"] >= count
        return time.monotonic() - state["t0"] >= seconds

    def fill(channel):
        while len(pending) < window and not done_sending():
            state["sent"] += 1
            pending.add(state["sent"])
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=uuid.uuid4().hex,
                timestamp=int(time.time()),
            )
            channel.basic_publish("", queue, ORDER, props, mandatory=True)
        if not pending:
            state["t1"] = time.monotonic()
            conn.close()

    def on_channel(channel):
        def on_confirm(frame):
            tag, method = frame.method.delivery_tag, frame.method
            done = {t for t in pending if t <= tag} if method.multiple else {tag}
            pending.difference_update(done)
            if isinstance(method, pika.spec.Basic.Ack):
                state["acked"] += len(done)
            fill(channel)

        def on_ready(_frame):
            state["t0"] = time.monotonic()
            fill(channel)

        channel.confirm_delivery(on_confirm, callback=on_ready)

    conn = pika.SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, e: c.ioloop.stop(),
        on_close_callback=lambda c, r: c.ioloop.stop(),
    )
    conn.ioloop.start()
    if state["t1"] is None:
        raise RuntimeError("the publisher lost RabbitMQ")
    return state["acked"] / (state["t1"] - state["t0"])


# --- The stack under test ---


class Stack:
    """The PM2 stack of ./scripts/up.sh, or (own) three services of its own."""

    def __init__(self, own):
        self.env = env = {**dotenv_values(REPO / ".env"), **os.environ}
        self.own, self.procs, self.stopped = own, {}, set()
        if own:
            env.update(
                INVENTORY_DB_NAME="bench_movies", BILLING_DB_NAME="bench_billing"
            )
            env.update(RABBITMQ_QUEUE="bench_queue", MALLOC_ARENA_MAX="2")
            # The services' broker users may only use billing_queue: here the
            # services log in as guest, which RabbitMQ admits from loopback only.
            for user in ("RABBITMQ_GATEWAY", "RABBITMQ_BILLING"):
                env.update({f"{user}_USER": GUEST, f"{user}_PASSWORD": GUEST})
            env.update(GATEWAY_PORT=str(free_port()), INVENTORY_PORT=str(free_port()))
            for name in ("GATEWAY", "INVENTORY", "BILLING", "RABBITMQ"):
                env[f"{name}_HOST"] = "127.0.0.1"
        self.movies_db, self.billing_db = (
            env["INVENTORY_DB_NAME"],
            env["BILLING_DB_NAME"],
        )
        self.queue = env["RABBITMQ_QUEUE"]
        self.gateway = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        self.inventory = f"http://127.0.0.1:{env['INVENTORY_PORT']}"
        # The services' users may not declare or purge queues: the benchmark
        # uses the broker's own guest, which logs in from this machine only.
        login = pika.PlainCredentials(GUEST, GUEST)
        port = int(env["RABBITMQ_PORT"])
        self.mq = pika.ConnectionParameters("127.0.0.1", port, credentials=login)

    def up(self):
        """Check the PM2 stack answers, or create the bench databases and start."""
        if not self.own:
            if http_get(self.gateway + "/health", 5)[0] != 200:
                sys.exit("bench: the stack is not up: ./scripts/up.sh, or --own-stack")
            return
        for db, role in ((self.movies_db, "INVENTORY"), (self.billing_db, "BILLING")):
            login = [self.env[f"{role}_DB_{k}"] for k in ("USER", "PASSWORD")]
            ensure_database(db, *login, REPO / "sql" / f"{role.lower()}_schema.sql")
        for service in APPS:
            self.start(service)
        wait_http(self.inventory + "/api/movies?limit=1")
        wait_http(self.gateway + "/health")

    def start(self, service):
        """Start the PM2 app, or the service as a process of its own."""
        self.stopped.discard(service)
        if not self.own:
            pm2("start", APPS[service])
            return
        python = REPO / "venv" / service / "bin" / "python"
        if not python.exists():
            python = Path(sys.executable)
        (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "logs" / f"{service}.log", "ab") as out:
            cmd = [str(python), str(REPO / f"{service}.py")]
            self.procs[service] = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self, service):
        """Stop the PM2 app, or end the process (SIGTERM, as PM2 would)."""
        if not self.own:
            self.stopped.add(service)
            pm2("stop", APPS[service])
            return
        proc = self.procs.pop(service)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)

    def down(self):
        """Leave the PM2 stack running as it was; stop our own services."""
        for service in list(self.stopped):
            self.start(service)
        for service in list(self.procs):
            self.stop(service)

    def pids(self):
        """{service: pid} of the running services."""
        if self.own:
            return {name: proc.pid for name, proc in self.procs.items()}
        by_name = {app["name"]: app.get("pid") for app in json.loads(pm2("jlist"))}
        return {svc: by_name[app] for svc, app in APPS.items() if by_name.get(app)}


# --- Measuring ---


def wrk(url, script, seconds, connections, env):
    """One wrk run with a bench/*.lua script: rate, p50, p99 and errors."""
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s"]
    cmd += ["--latency", "--timeout", "5s", "-s", str(BENCH / script), url]
    env = {**os.environ, "BENCH_LUA_DIR": str(BENCH), **env}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    r = json.loads(
        re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.MULTILINE).group(1)
    )
    errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    # Only successful answers count: a fast 503 is not throughput.
    rate = (r["requests"] - r["status"]) / (r["duration_us"] / 1e6)
    p50, p99 = r["p50_us"] / 1000, r["p99_us"] / 1000
    return {"rate": rate, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def median(runs):
    """The run with the median rate, with every run's rate."""
    chosen = dict(sorted(runs, key=lambda r: r["rate"])[len(runs) // 2])
    chosen["rates"] = [round(r["rate"]) for r in runs]
    return chosen


def measure(args, stack):
    """Every row and every floor: {name: figures}."""
    d, n = args.duration, args.repeat
    low, high = seed_movies(stack.movies_db)
    ids = {"BENCH_ID_MIN": str(low), "BENCH_ID_MAX": str(high)}
    gw, inv = stack.gateway, stack.inventory
    sizes = [
        str(len(http_get(gw + path)[1]))
        for path in (f"/api/movies/{low}", "/api/movies")
    ]
    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, str(BENCH / "bare_server.py"), str(port), *sizes]
    )
    bare_url = f"http://127.0.0.1:{port}"
    runs = {}

    def row(name, url, script, env=ids, connections=16, seconds=d):
        log(f"{name}: {n} x {seconds} s")
        figures = [wrk(url, script, seconds, connections, env) for _ in range(n)]
        runs[name] = median(figures)

    try:
        wait_http(bare_url + "/")
        wrk(gw + "/", "get_random.lua", 2, 16, ids)  # warm pools and plans
        row("W1", gw + "/", "get_random.lua")
        row("W1d", inv + "/", "get_random.lua")
        row("bare GET", bare_url + "/", "get_random.lua")
        row("W2", gw + "/api/movies?title=needle", "get_fixed.lua")
        row("W3", gw + "/api/movies", "get_fixed.lua")
        row("bare GET of W3's size", bare_url + "/big", "get_fixed.lua")
        row("W4", gw + "/api/movies", "post_movie.lua")
        row("bare POST", bare_url + "/api/movies", "post_movie.lua")
        one = {"connections": 1, "seconds": args.single_seconds}
        row("1c", gw + "/", "get_random.lua", **one)
        row("bare GET, one client", bare_url + "/", "get_random.lua", **one)
    finally:
        bare.terminate()
        bare.wait()
    stack.stop("billing")
    declare_queue(stack.mq, stack.queue)
    row("W5", gw + "/api/billing", "post_billing.lua", {"BENCH_ORDER": ORDER.decode()})
    rates, floor_queue = [], f"{stack.queue}_floor"
    for i in range(n):
        log(f"bare publisher: run {i + 1} of {n}, {d} s")
        declare_queue(stack.mq, floor_queue)
        rates.append({"rate": publish_confirmed(stack.mq, floor_queue, 16, seconds=d)})
    delete_queue(stack.mq, floor_queue)
    runs["bare publisher"] = median(rates)
    runs.update(drain(args, stack))
    runs["rss_mib"] = {svc: rss_mib(pid) for svc, pid in stack.pids().items()}
    return runs


def drain(args, stack):
    """Top the queue up to the backlog, start billing, time until every row is in."""
    with admin(stack.billing_db) as conn:
        conn.execute("TRUNCATE orders")
    depth = declare_queue(stack.mq, stack.queue, purge=False)
    if depth < args.backlog:
        publish_confirmed(stack.mq, stack.queue, 2000, count=args.backlog - depth)
    depth = declare_queue(stack.mq, stack.queue, purge=False)
    log(f"drain: {depth:,} messages")
    started = time.monotonic()
    stack.start("billing")
    with admin(stack.billing_db) as conn:
        count = "SELECT count(*) FROM orders"
        while (rows := conn.execute(count).fetchone()[0]) < depth:
            if time.monotonic() - started > args.drain_timeout:
                break
            time.sleep(0.2)
    drained = {"rate": rows / (time.monotonic() - started), "errors": depth - rows}
    log(f"bare INSERTs: {depth:,} rows")
    return {
        "drain": drained,
        "bare INSERTs": {"rate": insert_floor(stack.billing_db, depth)},
    }


def rss_mib(pid):
    """(VmRSS, VmHWM) of a process, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = (
        re.search(rf"^{k}:\s+(\d+)", status, re.MULTILINE).group(1)
        for k in ("VmRSS", "VmHWM")
    )
    return tuple(round(int(k) / 1024, 1) for k in kib)


# --- Report ---

# (row, what it measures, its floor, unit)
ROWS = [
    ("W1", "GET /api/movies/<id> via the gateway", "W1d", "req/s"),
    ("W1d", "the same, straight to inventory", "bare GET", "req/s"),
    ("W2", "GET /api/movies?title=needle", "bare GET", "req/s"),
    ("W3", "GET /api/movies (1,000 movies)", "bare GET of W3's size", "req/s"),
    ("W4", "POST /api/movies", "bare POST", "req/s"),
    ("W5", "POST /api/billing, confirmed", "bare publisher", "req/s"),
    ("1c", "W1 with one client", "bare GET, one client", "req/s"),
    ("drain", "queued orders into billing_db", "bare INSERTs", "msg/s"),
]


def table(runs):
    """The text table: each row, its floor, and the row as a share of its floor."""
    head = (
        "row    what                                     rate  p50 ms  p99 ms  errors"
    )
    lines = [head + "  floor (same run)              rate  share"]
    for name, what, floor, _unit in ROWS:
        r, f = runs[name], runs[floor]
        p50, p99 = (f"{r[k]:.2f}" if k in r else "-" for k in ("p50_ms", "p99_ms"))
        lines.append(
            f"{name:6} {what:38} {r['rate']:7,.0f} {p50:>7} {p99:>7} {r['errors']:>7}"
            f"  {floor:24} {f['rate']:9,.0f}  {r['rate'] / f['rate']:5.0%}"
        )
    rss = sorted(runs["rss_mib"].items())
    lines.append("\nMemory after the load, MiB (peak): ")
    lines[-1] += ", ".join(f"{svc} {now} ({peak})" for svc, (now, peak) in rss)
    every = [f"{k} {v['rates']}" for k, v in runs.items() if "rates" in v]
    return "\n".join([*lines, "Every run's rate: " + ", ".join(every)])


def svg(runs, caption):
    """The table as bars: each row above its floor, each pair on its own scale."""
    width, left, bar = 880, 270, 14
    out, y = [], 60
    for name, what, floor, unit in ROWS:
        r, f = runs[name]["rate"], runs[floor]["rate"]
        scale = (width - left - 140) / max(r, f)
        what, floor_text = (
            html.escape(f"{name}: {what}"),
            html.escape(f"floor: {floor}"),
        )
        out.append(f'<text x="10" y="{y + 11}" font-weight="bold">{what}</text>')
        out.append(f'<text x="10" y="{y + 27}" fill="#555">{floor_text}</text>')
        pairs = ((r, "#2f6db5", f" ({r / f:.0%})"), (f, "#a8a8a8", ""))
        for top, (value, color, note) in zip((y, y + bar + 2), pairs, strict=True):
            end = left + value * scale
            out.append(f'<rect x="{left}" y="{top}" width="{end - left:.1f}"')
            out[-1] += f' height="{bar}" fill="{color}"/>'
            out.append(f'<text x="{end + 6:.1f}" y="{top + 11}">{value:,.0f} {unit}')
            out[-1] += f"{note}</text>"
        y += 2 * bar + 22
    size = f'width="{width}" height="{y}" viewBox="0 0 {width} {y}"'
    legend = "blue: the workload (its share of the floor); grey: its floor, same run"
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" {size} font-family="sans-serif"',
            'font-size="12"><rect width="100%" height="100%" fill="white"/>',
            f'<text x="10" y="22" font-size="14" font-weight="bold">{html.escape(caption)}</text>',
            f'<text x="10" y="40" fill="#555">{legend}</text>',
            *out,
            "</svg>\n",
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--own-stack", action="store_true", help="own services on free ports")
    add("--quick", action="store_true", help="3 s runs, 1 repeat, 10,000 backlog")
    add("--duration", type=int, help="seconds per wrk run (10)")
    add("--repeat", type=int, help="runs per row (3)")
    add("--backlog", type=int, help="messages drained (100,000)")
    add("--drain-timeout", type=float, default=900)
    add("--svg", type=Path, help="also write the chart to this file")
    args = parser.parse_args()
    defaults = {"duration": (10, 3), "repeat": (3, 1), "backlog": (100_000, 10_000)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.single_seconds = 2 if args.quick else 5
    stack = Stack(own=args.own_stack)
    try:
        stack.up()
        runs = measure(args, stack)
    finally:
        stack.down()
    flags = " --own-stack" * args.own_stack + " --quick" * args.quick
    caption = (
        f"bench/run.py{flags}, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} "
        f"cores, wrk -c16, {args.duration} s runs, median of {args.repeat}"
    )
    print(caption)
    print(table(runs))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps({"caption": caption, **runs}))
    chart = svg(runs, caption)
    stem.with_suffix(".svg").write_text(chart)
    if args.svg:
        args.svg.write_text(chart)
    log(f"saved {stem.relative_to(REPO)}.json and .svg")


if __name__ == "__main__":
    main()
