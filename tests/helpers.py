"""Helpers the tests share: services as subprocesses, HTTP, PostgreSQL, RabbitMQ.

Fixtures live in conftest.py; test modules `import helpers`. The tests never
touch the stack's own databases (movies_db, billing_db) or queue: they use
movies_test, billing_test and queues of their own, and run each service on a
free port, so they can run beside ./scripts/up.sh.
"""

import collections
import hashlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import psycopg
import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the services are single modules at the top
from gateway import queue_arguments  # noqa: E402  (the one copy of the arguments)

ENV = dotenv_values(ROOT / ".env")
PYTHON = sys.executable
MOVIES_TEST_DB = "movies_test"
BILLING_TEST_DB = "billing_test"
LOGS = ROOT / "logs" / "tests"


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_connect(dbname="postgres"):
    """A superuser connection (local socket, as the machine's setup allows)."""
    try:
        return psycopg.connect(dbname=dbname, user="postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable ({exc}); start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )


def recreate_database(name, owner, password, schema):
    """Drop and create a test database owned by the service role, with schema."""
    with admin_connect() as conn:
        conn.execute(
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN
                    CREATE ROLE "{owner}" LOGIN PASSWORD '{password}';
                END IF; END $$"""
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    with admin_connect(name) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.execute(f'SET ROLE "{owner}"')
        conn.execute((ROOT / "sql" / schema).read_text())


def rabbit_params():
    """Connection parameters for the local RabbitMQ (guest, loopback only)."""
    return pika.ConnectionParameters(
        "127.0.0.1",
        5672,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=3,
    )


def rabbit_channel():
    """A fresh blocking channel; fails with a hint if RabbitMQ is down."""
    try:
        conn = pika.BlockingConnection(rabbit_params())
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"RabbitMQ is not reachable ({exc!r}); start it with: rabbitmq-server -detached"
        )
    return conn, conn.channel()


class Service:
    """One of the three services, run as a subprocess with its own settings."""

    def __init__(self, name, env, port=None):
        self.name, self.port, self.proc = name, port, None
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{name}-{uuid.uuid4().hex[:8]}.log"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait=True):
        """Start the process and, for HTTP services, wait until it listens."""
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [PYTHON, str(ROOT / f"{self.name}.py")],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait and self.port:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            pytest.fail(f"{self.name} did not listen on {self.port}: {self.tail()}")
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send sig and wait for the exit; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def tail(self, lines=30):
        """The end of the service's log."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def mapped_files(pid):
    """The files a process has mapped, from /proc/<pid>/maps."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split()[-1] for line in maps if "/" in line}


def inventory_env(port):
    """Settings for a test inventory on port, using movies_test."""
    return {
        "INVENTORY_HOST": "127.0.0.1",
        "INVENTORY_PORT": str(port),
        "INVENTORY_DB_HOST": "127.0.0.1",
        "INVENTORY_DB_NAME": MOVIES_TEST_DB,
        # Tests hold table locks past DB_WAIT on purpose: room before the
        # database cancels the queries waiting on them.
        "INVENTORY_QUERY_TIMEOUT": "8",
    }


def rabbit_env(queue):
    """Settings pointing a service at the local RabbitMQ and a test queue."""
    return {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": "5672",
        "RABBITMQ_GATEWAY_USER": "guest",
        "RABBITMQ_GATEWAY_PASSWORD": "guest",
        "RABBITMQ_BILLING_USER": "guest",
        "RABBITMQ_BILLING_PASSWORD": "guest",
        "RABBITMQ_QUEUE": queue,
    }


def billing_env(queue):
    """Settings for a test billing consumer on billing_test and queue."""
    return {
        **rabbit_env(queue),
        "BILLING_DB_HOST": "127.0.0.1",
        "BILLING_DB_NAME": BILLING_TEST_DB,
    }


def gateway_env(port, inventory_port, queue):
    """Settings for a test gateway in front of a test inventory and queue."""
    return {
        **rabbit_env(queue),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "INVENTORY_HOST": "127.0.0.1",
        "INVENTORY_PORT": str(inventory_port),
        "INVENTORY_TIMEOUT": "6",  # above inventory's own 4 s database wait
    }


def call(base, method, path, body=None, headers=None, raw=None):
    """One HTTP request; return (status, headers, parsed JSON or raw bytes)."""
    url = base.removeprefix("http://")
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    headers = dict(headers or {})
    if body is not None:
        raw = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=raw, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    parsed = json.loads(data) if ctype.startswith("application/json") else data
    return resp.status, dict(resp.getheaders()), parsed


def wait_for(predicate, timeout=20, *, interval=0.1, what="condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def rows(dbname, sql, params=None):
    """Run a query as superuser in a test database; return all rows."""
    with admin_connect(dbname) as conn:
        return conn.execute(sql, params).fetchall()


def delete_queues(*names):
    """Remove test queues (and their dead-letter queues)."""
    conn, channel = rabbit_channel()
    for name in names:
        channel.queue_delete(name)
        channel.queue_delete(f"{name}.dead")
    conn.close()


def queue_depth(name):
    """Messages ready in a queue (0 if the queue does not exist)."""
    conn, channel = rabbit_channel()
    try:
        return channel.queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def drain_queue(queue):
    """Take every message off queue; return [(properties, body)]."""
    conn, channel = rabbit_channel()
    got = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        got.append((properties, body))
    conn.close()
    return got


def message_id(label):
    """A message id of the gateway's random form, the same for the same label."""
    return hashlib.sha256(str(label).encode()).hexdigest()[:32]


def publish_raw(queue, bodies, message_ids=None, declare=True):
    """Publish bodies straight to queue with confirms (as a person could).

    Without message_ids each message gets a new id of the gateway's form;
    a given list is used as it is (None: no message id)."""
    conn, channel = rabbit_channel()
    if declare:
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.queue_declare(
            queue,
            durable=True,
            arguments=queue_arguments(queue),
        )
    channel.confirm_delivery()
    for i, body in enumerate(bodies):
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=uuid.uuid4().hex if message_ids is None else message_ids[i],
        )
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        channel.basic_publish("", queue, body, props)
    conn.close()


# --- Stopping and starting the machine's services ---


def pg_online():
    """Whether the machine's PostgreSQL cluster is running."""
    out = subprocess.run(
        ["pg_lsclusters", "-h"], check=False, capture_output=True, text=True
    )
    return " online " in f" {out.stdout} "


def pg(action):
    """Stop or start PostgreSQL; a start waits until it accepts connections."""
    version = subprocess.check_output(["ls", "/etc/postgresql"], text=True).split()[0]
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=False,
        capture_output=True,
        text=True,
    )
    # "already running" / "not running" is fine: the state is what we asked for
    assert done.returncode == 0 or pg_online() == (action == "start"), done.stderr
    if action == "start":
        wait_for(_pg_accepts, timeout=30, what="PostgreSQL to accept connections")


def _pg_accepts():
    try:
        psycopg.connect(dbname="postgres", user="postgres", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


def rabbit(action):
    """stop_app or start_app RabbitMQ; a start waits until it takes connections."""
    subprocess.run(["rabbitmqctl", "-q", action], check=True, capture_output=True)
    if action == "start_app":
        wait_for(_rabbit_accepts, timeout=30, what="RabbitMQ to accept connections")


def _rabbit_accepts():
    params = pika.ConnectionParameters(
        "127.0.0.1",
        5672,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=2,
    )
    try:
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False


# --- Faults: traffic, outages and what they cost ---

REQUEST_TIMEOUT = 10  # the services' deadline for a whole request
ANSWER_WITHIN = 5  # seconds: nothing may hang longer during an outage
MIB = 1024 * 1024
CLIENT_ERRORS = (OSError, http.client.HTTPException)


def figure(name, **values):
    """Print a fault test's measurements as one line: FIGURE faults.<name>: k=v ..."""
    print(f"\nFIGURE faults.{name}: " + " ".join(f"{k}={v}" for k, v in values.items()))


def order(user_id, items=1, amount="1.50"):
    """A valid order body."""
    return {"user_id": user_id, "number_of_items": items, "total_amount": amount}


def count_orders():
    """Rows in billing_test.orders."""
    return rows("billing_test", "SELECT count(*) FROM orders")[0][0]


def stored_users(low, high):
    """{user_id: number of rows} for orders with user_id in [low, high]."""
    found = rows(
        "billing_test",
        "SELECT user_id, count(*) FROM orders WHERE user_id BETWEEN %s AND %s"
        " GROUP BY user_id",
        (low, high),
    )
    return dict(found)


def start_gateway(procs, inventory_port, queue):
    """A gateway of the test's own, with the deployed INVENTORY_TIMEOUT."""
    port = free_port()
    env = gateway_env(port, inventory_port, queue)
    env["INVENTORY_TIMEOUT"] = ENV["INVENTORY_TIMEOUT"]  # 10 s, longer than DB_WAIT
    gateway = procs("gateway", env, port)
    wait_for(
        lambda: call(gateway.url, "GET", "/health")[0] == 200,
        what="gateway /health to answer 200",
    )
    return gateway


class Client:
    """One keep-alive HTTP/1.1 connection; reopened after an error."""

    def __init__(self, port, timeout=10):
        self.port, self.timeout, self.conn = port, timeout, None

    def request(self, method, path, body=None):
        """Return (status, JSON or bytes); raise OSError/HTTPException on failure."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=self.timeout
            )
        raw = None if body is None else json.dumps(body).encode()
        headers = {} if raw is None else {"Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=raw, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except CLIENT_ERRORS:
            self.close()
            raise
        if resp.will_close:
            self.close()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            data = json.loads(data)
        return resp.status, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Posters:
    """Threads posting orders with unique user_ids to a gateway until stopped."""

    def __init__(self, port, threads, first_user):
        self.port, self.threads = port, threads
        self.first_user = first_user
        self._ids = itertools.count(first_user)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = []
        self.results = []  # (user_id, status or error name, seconds, started at)

    def start(self):
        for _ in range(self.threads):
            worker = threading.Thread(target=self._post, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self):
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        assert not any(w.is_alive() for w in self._workers), "a poster hung"

    def _post(self):
        client = Client(self.port)
        while not self._stop.is_set():
            user = next(self._ids)
            start = time.monotonic()
            try:
                status, _ = client.request("POST", "/api/billing", order(user))
            except CLIENT_ERRORS as exc:
                status = type(exc).__name__
            with self._lock:
                self.results.append((user, status, time.monotonic() - start, start))
            time.sleep(0.005 if status == 200 else 0.05)
        client.close()

    def ok_since(self, moment):
        """Orders answered 200 that were sent after moment."""
        with self._lock:
            return sum(1 for _, s, _, t in self.results if s == 200 and t >= moment)

    @property
    def last_user(self):
        return self.first_user + len(self.results) + self.threads

    def summary(self):
        """(users answered 200, other users, Counter of statuses, max seconds)."""
        ok = {u for u, s, _, _ in self.results if s == 200}
        other = {u for u, s, _, _ in self.results if s != 200}
        statuses = collections.Counter(s for _, s, _, _ in self.results)
        slowest = max(d for _, _, d, _ in self.results)
        return ok, other, statuses, slowest


def wait_stored(ok_users, low, high, timeout=60):
    """Wait until every user in ok_users has an order; return the final counts."""
    wait_for(
        lambda: ok_users <= set(stored_users(low, high)),
        timeout=timeout,
        what=f"{len(ok_users)} confirmed orders to be stored",
    )
    time.sleep(0.5)  # let a late duplicate show up, if there were one
    return stored_users(low, high)


def timed_call(service, method, path, body=None):
    """Call service; return (status, answer, seconds it took)."""
    start = time.monotonic()
    status, _, answer = call(service.url, method, path, body)
    return status, answer, time.monotonic() - start
