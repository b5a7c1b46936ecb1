"""Fault tolerance: crashes, restarts, overload and hostile input lose nothing.

Each test breaks something on purpose (kill -9, a stopped database or broker, a
restarted service, 64 clients at once, idle and slow connections, hostile
requests, poison messages), puts things back in `finally`, and prints one line
`FIGURE faults.<name>: key=value ...` with what it measured.

Some tests stop PostgreSQL or RabbitMQ; run them under the team's lock so that
nobody else's run is hit by the outage:

    flock /tmp/team/services.lock venv/dev/bin/python -m pytest -q \
        tests/test_faults.py -s
"""

import collections
import concurrent.futures
import contextlib
import http.client
import itertools
import json
import random
import selectors
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.parse
import uuid

import helpers
import pika
import pytest

REQUEST_TIMEOUT = 10  # the services' deadline for a whole request
MAX_CONNECTIONS = 512  # the services' cap on open client connections
ANSWER_WITHIN = 5  # seconds: nothing may hang longer during an outage
MIB = 1024 * 1024
CLIENT_ERRORS = (OSError, http.client.HTTPException)


# --- Helpers ---


def figure(name, **values):
    """Print the test's measurements on one greppable line."""
    print(f"\nFIGURE faults.{name}: " + " ".join(f"{k}={v}" for k, v in values.items()))


def order(user_id, items=1, amount="1.50"):
    """A valid order body."""
    return {"user_id": user_id, "number_of_items": items, "total_amount": amount}


def count_orders():
    """Rows in billing_test.orders."""
    return helpers.rows("billing_test", "SELECT count(*) FROM orders")[0][0]


def stored_users(low, high):
    """{user_id: number of rows} for orders with user_id in [low, high]."""
    found = helpers.rows(
        "billing_test",
        "SELECT user_id, count(*) FROM orders WHERE user_id BETWEEN %s AND %s"
        " GROUP BY user_id",
        (low, high),
    )
    return dict(found)


def publish_fast(queue, bodies, message_ids):
    """Publish many persistent messages without waiting for each confirm."""
    helpers.publish_raw(queue, [])  # declares the queue and its dead-letter queue
    conn, channel = helpers.rabbit_channel()
    for body, message_id in zip(bodies, message_ids, strict=True):
        props = pika.BasicProperties(delivery_mode=2, message_id=message_id)
        channel.basic_publish("", queue, json.dumps(body), props)
    conn.close()


def thread_count(pid):
    """Threads of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def start_gateway(procs, inventory_port, queue):
    """A gateway of the test's own, with the deployed INVENTORY_TIMEOUT."""
    port = helpers.free_port()
    env = helpers.gateway_env(port, inventory_port, queue)
    env["INVENTORY_TIMEOUT"] = helpers.ENV[
        "INVENTORY_TIMEOUT"
    ]  # 10 s, longer than DB_WAIT
    gateway = procs("gateway", env, port)
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "GET", "/health")[0] == 200,
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
    helpers.wait_for(
        lambda: ok_users <= set(stored_users(low, high)),
        timeout=timeout,
        what=f"{len(ok_users)} confirmed orders to be stored",
    )
    time.sleep(0.5)  # let a late duplicate show up, if there were one
    return stored_users(low, high)


# --- Fixtures ---


@pytest.fixture
def procs(queue):
    """Start services for one test; stop whatever still runs afterwards.

    Depends on `queue` so that the services stop before their queue is deleted
    (a running consumer would declare it again).
    """
    started = []

    def start(name, env, port=None):
        service = helpers.Service(name, env, port)
        started.append(service)
        return service.start()

    yield start
    for service in reversed(started):
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()  # on a timeout, Service.stop has killed it


# --- 1. kill -9 while draining a backlog ---


def test_billing_killed_three_times_while_draining_backlog(procs, queue, orders_db):
    total = 20_000
    publish_fast(
        queue, [order(i + 1) for i in range(total)], [f"k9-{i}" for i in range(total)]
    )
    helpers.wait_for(
        lambda: helpers.queue_depth(queue) == total, what=f"{total} queued messages"
    )
    billing = procs("billing", helpers.billing_env(queue))
    at_kill = []
    rng = random.Random()
    # one kill early, one a third of the way, one two thirds of the way through
    for low in (1, total // 3, 2 * total // 3):
        threshold = max(low, at_kill[-1] + 1 if at_kill else 1) + rng.randrange(1500)
        helpers.wait_for(
            lambda threshold=threshold: count_orders() >= threshold,
            timeout=60,
            interval=0.005,
            what=f"billing to store {threshold} orders",
        )
        time.sleep(rng.uniform(0, 0.03))  # land anywhere: mid-batch, pre-ack
        billing.stop(signal.SIGKILL)
        at_kill.append(count_orders())
        billing.start()
    assert at_kill[-1] < total, f"the backlog was drained before the 3rd kill {at_kill}"
    helpers.wait_for(
        lambda: count_orders() >= total, timeout=120, what=f"{total} orders"
    )
    assert billing.stop() == 0  # SIGTERM: unacked messages go back to the queue
    stored, users, ids = helpers.rows(
        orders_db,
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT message_id)"
        " FROM orders",
    )[0]
    assert users == total and ids == total
    assert stored == total, f"{stored - total} orders stored twice"
    assert helpers.queue_depth(queue) == 0 and helpers.queue_depth(f"{queue}.dead") == 0
    figure(
        "kill9",
        posted=total,
        stored=users,
        lost=total - users,
        duplicated=stored - users,
        kills=3,
        stored_at_kills="/".join(map(str, at_kill)),
    )


# --- 2. RabbitMQ restarted under traffic ---


def test_rabbitmq_restart_while_posting(procs, inventory, queue, orders_db):
    billing = procs("billing", helpers.billing_env(queue))
    gateway = start_gateway(procs, inventory.port, queue)
    posters = Posters(gateway.port, threads=8, first_user=1_000_000).start()
    try:
        time.sleep(2)
        try:
            helpers.rabbit("stop_app")
            time.sleep(4)
        finally:
            helpers.rabbit("start_app")
        back = time.monotonic()
        helpers.wait_for(
            lambda: posters.ok_since(back) >= 50,
            timeout=40,
            what="posts to succeed again after RabbitMQ came back",
        )
        first_ok = min(t for _, s, _, t in posters.results if s == 200 and t >= back)
        time.sleep(1)
    finally:
        posters.stop()
    ok, other, statuses, slowest = posters.summary()
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0, "no request noticed the outage"
    assert slowest < ANSWER_WITHIN, f"a request took {slowest:.1f}s"
    assert billing.proc.poll() is None and gateway.proc.poll() is None
    counts = wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    assert not lost and not duplicated
    figure(
        "rabbit_restart",
        posted=len(posters.results),
        ok=len(ok),
        unavailable=statuses[503],
        stored_ok=len(ok & set(counts)),
        stored_after_503=len(other & set(counts)),
        lost=len(lost),
        duplicated=duplicated,
        max_latency_s=f"{slowest:.2f}",
        first_200_after_restart_s=f"{first_ok - back:.1f}",
    )


# --- 3. Billing database restarted under traffic ---


def test_billing_database_restart_while_posting(procs, inventory, queue, orders_db):
    billing = procs("billing", helpers.billing_env(queue))
    gateway = start_gateway(procs, inventory.port, queue)
    posters = Posters(gateway.port, threads=8, first_user=2_000_000).start()
    try:
        time.sleep(1.5)
        try:
            helpers.pg("stop")
            time.sleep(4)
            backlog = helpers.queue_depth(queue)
        finally:
            helpers.pg("start")
        time.sleep(2)
    finally:
        posters.stop()
    ok, _, statuses, slowest = posters.summary()
    assert set(statuses) == {200}, statuses
    assert billing.proc.poll() is None
    counts = wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    dead = helpers.queue_depth(f"{queue}.dead")
    assert not lost and not duplicated and not dead
    assert backlog > 0, "orders did not pile up during the outage"
    figure(
        "billing_db_restart",
        posted=len(posters.results),
        ok=len(ok),
        stored=len(counts),
        lost=len(lost),
        duplicated=duplicated,
        dead_lettered=dead,
        backlog_during_outage=backlog,
        max_latency_s=f"{slowest:.2f}",
    )


# --- 4. Inventory database restarted ---


def _timed_call(service, method, path, body=None):
    start = time.monotonic()
    status, _, answer = helpers.call(service.url, method, path, body)
    return status, answer, time.monotonic() - start


def test_inventory_database_outage_is_503_then_recovers(
    procs, inventory, queue, clean_movies
):
    gateway = start_gateway(procs, inventory.port, queue)
    _, _, movie = helpers.call(gateway.url, "POST", "/api/movies", {"title": "Before"})
    probes = [
        (service, method, path, body)
        for service in (inventory, gateway)
        for method, path, body in (
            ("GET", "/api/movies", None),
            ("GET", f"/api/movies/{movie['id']}", None),
            ("GET", "/api/movies?title=Bef&limit=5", None),
            ("POST", "/api/movies", {"title": "During outage"}),
            ("PUT", f"/api/movies/{movie['id']}", {"title": "Changed"}),
            ("DELETE", f"/api/movies/{movie['id']}", None),
        )
    ]
    try:
        helpers.pg("stop")
        with concurrent.futures.ThreadPoolExecutor(len(probes)) as pool:
            answers = list(pool.map(lambda p: _timed_call(*p), probes))
            health = _timed_call(gateway, "GET", "/health")
    finally:
        helpers.pg("start")
    back = time.monotonic()
    for (service, method, path, _), (status, body, seconds) in zip(
        probes, answers, strict=True
    ):
        assert status == 503, (service.name, method, path, status, body)
        assert body == {"error": "database unavailable"}, (service.name, path)
        assert seconds < ANSWER_WITHIN, (service.name, method, path, seconds)
    assert health[0] == 503 and health[1]["inventory"] != "ok"
    for service in (inventory, gateway):
        helpers.wait_for(
            lambda s=service: helpers.call(s.url, "GET", "/api/movies")[0] == 200,
            timeout=30,
            what=f"{service.name} to recover",
        )
    recovered = time.monotonic() - back
    assert (
        helpers.call(gateway.url, "POST", "/api/movies", {"title": "After"})[0] == 201
    )
    assert inventory.proc.poll() is None and gateway.proc.poll() is None
    assert helpers.rows(clean_movies, "SELECT title FROM movies ORDER BY id") == [
        ("Before",),
        ("After",),
    ]
    figure(
        "inventory_db_outage",
        answers=len(answers),
        all_503=True,
        max_answer_s=f"{max(a[2] for a in answers):.1f}",
        recovered_after_s=f"{recovered:.1f}",
    )


# --- 5. Inventory stopped ---


def test_inventory_down_gateway_502_and_billing_still_200(procs, queue, clean_movies):
    inventory_port = helpers.free_port()
    inventory = procs(
        "inventory", helpers.inventory_env(inventory_port), inventory_port
    )
    gateway = start_gateway(procs, inventory_port, queue)
    # pools a connection
    assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
    inventory.stop()
    answers = []
    for method, path, body in (
        ("GET", "/api/movies", None),
        ("GET", "/api/movies/1", None),
        ("POST", "/api/movies", {"title": "Nowhere"}),
        ("PUT", "/api/movies/1", {"title": "Nowhere"}),
        ("DELETE", "/api/movies/1", None),
    ):
        status, answer, seconds = _timed_call(gateway, method, path, body)
        assert status == 502 and answer["error"], (method, path, status, answer)
        assert seconds < ANSWER_WITHIN
        answers.append(seconds)
    status, _, answer = helpers.call(gateway.url, "POST", "/api/billing", order(5))
    assert status == 200 and answer == {"message": "Message posted"}
    assert helpers.queue_depth(queue) == 1
    status, _, answer = helpers.call(gateway.url, "GET", "/health")
    assert status == 503 and answer["inventory"] != "ok" and answer["rabbitmq"] == "ok"
    inventory.start()
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "GET", "/api/movies")[0] == 200,
        what="the gateway to reach inventory again",
    )
    figure(
        "inventory_down",
        movie_answers=f"{len(answers)}x502",
        max_502_s=f"{max(answers):.2f}",
        billing=200,
        queued=1,
    )


# --- 6. Gateway restarted under traffic ---


def test_gateway_restart_while_posting(procs, inventory, queue, orders_db):
    procs("billing", helpers.billing_env(queue))
    gateway = start_gateway(procs, inventory.port, queue)
    posters = Posters(gateway.port, threads=8, first_user=3_000_000).start()
    try:
        time.sleep(1.5)
        down = time.monotonic()
        exit_code = gateway.stop(signal.SIGTERM)
        gateway.start()  # the same port
        back = time.monotonic()
        helpers.wait_for(
            lambda: posters.ok_since(back) >= 50,
            timeout=30,
            what="posts to succeed through the restarted gateway",
        )
    finally:
        posters.stop()
    assert exit_code == 0
    ok, _, statuses, _ = posters.summary()
    assert {s for s in statuses if isinstance(s, int)} <= {200, 503}, statuses
    counts = wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    assert not lost and not duplicated
    figure(
        "gateway_restart",
        posted=len(posters.results),
        ok=len(ok),
        refused_or_cut=sum(n for s, n in statuses.items() if not isinstance(s, int)),
        unavailable=statuses[503],
        stored_ok=len(ok & set(counts)),
        lost=len(lost),
        duplicated=duplicated,
        restart_s=f"{back - down:.2f}",
    )


# --- 7. 64 clients at once ---

LOAD_CLIENTS = 64
LOAD_SECONDS = 30
LOAD_OPS = ("create", "get", "update", "delete", "search", "page", "missing", "order")
LOAD_WEIGHTS = (18, 18, 10, 8, 10, 8, 4, 24)


def _load_client(index, port, prefix, deadline, result):
    """One client's session: its own movies, its own orders, exact expectations."""
    rng = random.Random(index)
    client = Client(port)
    marker = f"{prefix}-c{index:02d}-"
    search = "/api/movies?title=" + urllib.parse.quote(marker)
    mine, orders, serial = {}, [], 0
    while time.monotonic() < deadline:
        op = rng.choices(LOAD_OPS, LOAD_WEIGHTS)[0]
        if op in ("get", "update", "delete") and not mine:
            op = "create"
        serial += 1
        movie_id = rng.choice(list(mine)) if op in ("get", "update", "delete") else 0
        if op == "create":
            body = {"title": f"{marker}{serial}", "description": f"d{serial}"}
            request = ("POST", "/api/movies", body)
        elif op == "get":
            request = ("GET", f"/api/movies/{movie_id}", None)
        elif op == "update":
            change = rng.choice(["title", "description"])
            value = f"{marker}{serial}u" if change == "title" else f"u{serial}"
            request = ("PUT", f"/api/movies/{movie_id}", {change: value})
        elif op == "delete":
            request = ("DELETE", f"/api/movies/{movie_id}", None)
        elif op == "search":
            request = ("GET", search, None)
        elif op == "page":
            request = ("GET", f"/api/movies?limit=5&offset={rng.randrange(50)}", None)
        elif op == "missing":
            request = ("GET", "/api/movies/2147483647", None)
        else:
            user = 4_000_000 + index * 100_000 + serial
            request = ("POST", "/api/billing", order(user))
        start = time.monotonic()
        try:
            status, answer = client.request(*request)
        except CLIENT_ERRORS as exc:
            result["errors"].append(f"{request[:2]}: {exc!r}")
            continue
        result["latencies"].append(time.monotonic() - start)
        result["statuses"][status] += 1
        if status >= 500:
            result["server_errors"].append((request[:2], status, answer))
            continue
        expected = {
            "create": 201,
            "get": 200,
            "update": 200,
            "delete": 200,
            "search": 200,
            "page": 200,
            "missing": 404,
            "order": 200,
        }[op]
        if status != expected:
            result["wrong"].append((request[:2], status, answer))
            continue
        if op == "create":
            if answer != {"id": answer["id"], **body}:
                result["wrong"].append((request[:2], status, answer))
            mine[answer["id"]] = answer
        elif op == "get" and answer != mine[movie_id]:
            result["wrong"].append((request[:2], answer, mine[movie_id]))
        elif op == "update":
            want = {**mine[movie_id], **request[2]}
            if answer != want:
                result["wrong"].append((request[:2], answer, want))
            mine[movie_id] = answer
        elif op == "delete":
            del mine[movie_id]
            result["deleted"] += 1
        elif op == "search" and answer != [mine[i] for i in sorted(mine)]:
            result["wrong"].append((request[:2], len(answer), len(mine)))
        elif op == "order":
            orders.append(request[2]["user_id"])
        result["created"] += op == "create"
    client.close()
    result["movies"] = mine
    result["orders"] = orders


def test_64_clients_for_30_seconds(procs, inventory, queue, orders_db, clean_movies):
    procs("billing", helpers.billing_env(queue))
    gateway = start_gateway(procs, inventory.port, queue)
    prefix = f"load{uuid.uuid4().hex[:6]}"
    results = [
        {
            "errors": [],
            "server_errors": [],
            "wrong": [],
            "latencies": [],
            "statuses": collections.Counter(),
            "created": 0,
            "deleted": 0,
        }
        for _ in range(LOAD_CLIENTS)
    ]
    deadline = time.monotonic() + LOAD_SECONDS
    threads = [
        threading.Thread(
            target=_load_client, args=(i, gateway.port, prefix, deadline, results[i])
        )
        for i in range(LOAD_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    errors = [e for r in results for e in r["errors"]]
    server_errors = [e for r in results for e in r["server_errors"]]
    wrong = [e for r in results for e in r["wrong"]]
    assert not server_errors, server_errors[:10]
    assert not errors, errors[:10]
    assert not wrong, wrong[:10]
    expected = {i: m for r in results for i, m in r["movies"].items()}
    present = {
        i: {"id": i, "title": t, "description": d}
        for i, t, d in helpers.rows(
            clean_movies,
            "SELECT id, title, description FROM movies WHERE title LIKE %s",
            (f"{prefix}-%",),
        )
    }
    assert present == expected
    ok_orders = [u for r in results for u in r["orders"]]
    counts = wait_stored(set(ok_orders), 4_000_000, 4_000_000 + 100 * 100_000)
    assert sorted(counts) == sorted(ok_orders) and set(counts.values()) == {1}
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses = sum((r["statuses"] for r in results), collections.Counter())
    created = sum(r["created"] for r in results)
    deleted = sum(r["deleted"] for r in results)
    figure(
        "load64",
        clients=LOAD_CLIENTS,
        seconds=LOAD_SECONDS,
        requests=len(latencies),
        rps=round(len(latencies) / LOAD_SECONDS),
        p50_ms=round(statistics.median(latencies) * 1000, 1),
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        max_ms=round(latencies[-1] * 1000),
        server_errors=0,
        connection_errors=0,
        movies_created=created,
        deleted=deleted,
        rows=len(present),
        orders_ok=len(ok_orders),
        orders_stored=len(counts),
        statuses="/".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
    )


# --- 8. Idle and slow clients ---

IDLE_PER_SERVER = 200


def _slow_client(port, log):
    """Send a request's headers one byte a second; log (seconds, answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    start = time.monotonic()
    pending = b"GET /api/movies HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40
    answer = b""
    try:
        for byte in pending:
            sock.sendall(bytes([byte]))
            readable, _, _ = select_one(sock, 1.0)
            if readable:
                break
        while chunk := sock.recv(4096):
            answer += chunk
    except OSError:
        pass
    log.append((time.monotonic() - start, answer))
    sock.close()


def select_one(sock, timeout):
    """Wait up to timeout for sock to be readable."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout)), None, None


def test_idle_and_slow_clients_do_not_starve_others(procs, inventory, queue):
    gateway = start_gateway(procs, inventory.port, queue)
    servers = {"gateway": gateway, "inventory": inventory}
    baseline = {n: thread_count(s.proc.pid) for n, s in servers.items()}
    sel = selectors.DefaultSelector()
    idle = []  # [server name, seconds until closed, bytes received]
    opened = time.monotonic()
    for name, server in servers.items():
        for _ in range(IDLE_PER_SERVER):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            idle.append([name, None, b""])
            sel.register(sock, selectors.EVENT_READ, idle[-1])
    slow = {name: [] for name in servers}
    slow_threads = [
        threading.Thread(target=_slow_client, args=(s.port, slow[n]), daemon=True)
        for n, s in servers.items()
    ]
    for thread in slow_threads:
        thread.start()
    latencies = {name: [] for name in servers}
    statuses = collections.Counter()
    peak = dict(baseline)
    keep_alive = {name: Client(s.port) for name, s in servers.items()}
    open_count = 2 * IDLE_PER_SERVER
    try:
        while open_count and time.monotonic() - opened < REQUEST_TIMEOUT + 8:
            for key, _ in sel.select(0.05):
                state = key.data
                try:
                    chunk = key.fileobj.recv(4096)
                except OSError:
                    chunk = b""
                state[2] += chunk
                if not chunk:
                    state[1] = time.monotonic() - opened
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    open_count -= 1
            for name, server in servers.items():
                for fresh in (True, False):
                    start = time.monotonic()
                    if fresh:
                        status = helpers.call(server.url, "GET", "/api/movies?limit=1")[
                            0
                        ]
                    else:
                        status = keep_alive[name].request("GET", "/api/movies?limit=1")[
                            0
                        ]
                    latencies[name].append(time.monotonic() - start)
                    statuses[status] += 1
                peak[name] = max(peak[name], thread_count(server.proc.pid))
            time.sleep(0.1)
    finally:
        leftover = [key.fileobj for key in sel.get_map().values()]
        for sock in leftover:
            sock.close()
        sel.close()
        for client in keep_alive.values():
            client.close()
    for thread in slow_threads:
        thread.join(REQUEST_TIMEOUT + 10)
    assert not leftover, f"{len(leftover)} idle connections still open"
    assert statuses == {200: sum(statuses.values())}, statuses
    for name, server in servers.items():
        worst = max(latencies[name])
        assert worst < 1.0, f"{name}: a request took {worst:.2f}s"
        assert peak[name] <= baseline[name] + IDLE_PER_SERVER + 8, (name, peak)
        assert peak[name] <= MAX_CONNECTIONS + baseline[name]
        seconds, answer = slow[name][0]
        assert REQUEST_TIMEOUT - 1 <= seconds <= REQUEST_TIMEOUT + 6, (name, seconds)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        helpers.wait_for(
            lambda s=server, b=baseline[name]: thread_count(s.proc.pid) <= b + 4,
            timeout=10,
            what=f"{name}'s threads to go back to {baseline[name]}",
        )
    closed_after = sorted(seconds for _, seconds, _ in idle)
    assert closed_after[0] >= REQUEST_TIMEOUT - 0.5, closed_after[:5]
    assert closed_after[-1] <= REQUEST_TIMEOUT + 6, closed_after[-5:]
    answers = {data for _, _, data in idle}
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    figure(
        "idle_slow",
        idle=f"{IDLE_PER_SERVER}x2",
        p50_ms=round(
            statistics.median(latencies["gateway"] + latencies["inventory"]) * 1000, 1
        ),
        max_ms=round(max(latencies["gateway"] + latencies["inventory"]) * 1000),
        probes=sum(statuses.values()),
        threads_gateway=f"{baseline['gateway']}->{peak['gateway']}",
        threads_inventory=f"{baseline['inventory']}->{peak['inventory']}",
        idle_closed_s=f"{closed_after[0]:.1f}..{closed_after[-1]:.1f}",
        slow_cut_s="/".join(f"{slow[n][0][0]:.1f}" for n in servers),
    )


# --- 9. Hostile input ---


class Reply:
    """One answer read off a raw socket (status None: a bare HTTP/0.9 body)."""

    def __init__(self, status, headers, body, seconds):
        self.status, self.headers, self.body = status, headers, body
        self.seconds = seconds

    @property
    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def __repr__(self):
        return f"Reply({self.status}, {self.body[:120]!r}, {self.seconds:.1f}s)"


class RawConnection:
    """A socket that sends arbitrary bytes and parses the answers."""

    def __init__(self, port, timeout=REQUEST_TIMEOUT + 8):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.start = time.monotonic()

    def send(self, data):
        """Send data; a server that already answered may reset the rest."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _fill(self):
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            chunk = b""
        self.buffer += chunk
        return chunk

    def reply(self, head=False):
        """The next answer, or None when the server closed without one."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                break
        if not self.buffer:
            return None
        seconds = time.monotonic() - self.start
        if not self.buffer.startswith(b"HTTP/"):
            while self._fill():
                pass
            body, self.buffer = self.buffer, b""
            return Reply(None, {}, body, seconds)
        top, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", 0))
        while len(self.buffer) < length and self._fill():
            pass
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(lines[0].split()[1]), headers, body, seconds)

    def closed(self):
        """Whether the server closes the connection (after any pending answer)."""
        return not self.buffer and not self._fill()

    def close(self):
        self.sock.close()


def exchange(port, data, head=False):
    """Send raw bytes on a new connection and return the first answer."""
    conn = RawConnection(port)
    try:
        conn.send(data)
        return conn.reply(head)
    finally:
        conn.close()


def post_raw(path, body, ctype=b"application/json", method=b"POST", length=None):
    """A raw request with a body (and a Content-Length that may lie)."""
    length = len(body) if length is None else length
    return (
        method
        + b" "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(length).encode()
        + b"\r\n\r\n"
        + body
    )


def get_raw(target, method=b"GET"):
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def assert_json_error(reply, what, statuses=range(400, 500)):
    """A 4xx (or the given) status with a JSON {"error": ...} body."""
    assert reply is not None, f"{what}: closed without an answer"
    assert reply.status in statuses, (what, reply)
    assert reply.headers.get("content-type") == "application/json", (what, reply)
    assert isinstance(reply.json, dict) and reply.json.get("error"), (what, reply)


BAD_MOVIE_BODIES = [
    b'{"title": "abc',
    b'{"title": "abc", "description": ',
    b"",
    b"[" * 100_000,
    b'{"title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    b'{"title": "\xff\xfe\xfd"}',
    b'{"title": "a\x00b"}',
    b'{"title": "a\\u0000b"}',
    b'{"title": "x", "description": "a\\u0000b"}',
    b'{"title": "\\ud800"}',
    b"\x00" * 64,
    b'{"title": NaN}',
    b'{"title": "x", "description": Infinity}',
    b'{"title": 1e999999999}',
    b'{"title": ' + b"9" * 5000 + b"}",
    b'{"title": {"$ne": null}}',
    b'{"title": ["x"]}',
    b'{"title": true}',
    b'{"title": "' + b"x" * 256 + b'"}',
    b'{"title": "x", "description": "' + b"d" * 10_001 + b'"}',
    b'{"title": "x", "id": 1}',
    b'{"title": "   "}',
    b"null",
    b'"just a string"',
    b"[]",
]

BAD_ORDER_BODIES = [
    b'{"user_id": 1, "number_of_items": 1, "total_amount": ',
    b"[" * 60_000,
    b'{"user_id": "\xff", "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": "1\\u0000", "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": "1; DROP TABLE orders; --", "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": "\' OR \'1\'=\'1", "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": 1, "number_of_items": "1 OR 1=1", "total_amount": 1}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": "1; DROP TABLE x"}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e999999999}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e30}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": -1e30}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e-999999999}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": NaN}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": "Infinity"}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": -0.01}',
    b'{"user_id": 1e3, "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": 2147483648, "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": ' + b"9" * 5000 + b', "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": true, "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": [1], "number_of_items": 1, "total_amount": 1}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": 1, "__proto__": 1}',
]

SQL_INJECTIONS = [
    "'; DROP TABLE movies; --",
    "%' OR '1'='1",
    "' OR 1=1 --",
    "1); DELETE FROM movies; --",
    "$$; DROP TABLE movies; $$",
    "\\'; TRUNCATE movies; --",
    "_%\\",
]

BAD_QUERIES = [
    "limit=1%3BDROP%20TABLE%20movies",
    "offset=0%20OR%201%3D1",
    "limit=-1",
    "limit=99999999999999999999",
    "offset=99999999999",
    "title=%00",
    "title=%ff%fe",
    "title=" + "x" * 256,
]

BAD_PATHS = [
    "/api/movies/99999999999999999999999999",
    "/api/movies/2147483648",
    "/api/movies/-1",
    "/api/movies/0",
    "/api/movies/1e3",
    "/api/movies/0x1",
    "/api/movies/%201",
    "/api/movies/%EF%BC%91",
    "/api/movies/1%27%20OR%20%271%27%3D%271",
    "/api/movies/1;DROP%20TABLE%20movies",
    "/api/movies/../..",
    "/api/movies/%2e%2e/",
    "/api/movies/%2e%2e/%2e%2e/etc/passwd",
    "/api/movies/..%2f..%2f.env",
    "/api/movies/1/2",
    "/../../etc/passwd",
    "//etc/passwd",
    "/docs/..%2f..%2f.env",
    "/docs/%2e%2e%2f.env",
    "/docs/../.env",
    "/openapi.yaml/../.env",
]

RAW_TARGETS = [
    b"/api/movies/\x00",
    b"/api/movies/\x7f",
    b"/api/movies/\xc3\xa9",
    b"/api/movies?title=\xc3\xa9",
    b"/api/movies?title=a\x01b",
]

ODD_METHODS = [
    b"PATCH",
    b"TRACE",
    b"OPTIONS",
    b"FOO",
    b"A" * 200,
    b"G\x00T",
    b"G\xc3\x89T",
]

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET / FOO/1.1\r\n\r\n",
    b"GET / HTTP/1.x\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(48)) + b"\r\n\r\n",
]

HEADER_FLOODS = [
    b"GET /api/movies HTTP/1.1\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    b"GET /api/movies HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    (
        b"POST /api/movies HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: -5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
]


def movies_state(db):
    return helpers.rows(db, "SELECT id, title, description FROM movies ORDER BY id")


class Hostile:
    """Sends hostile requests to gateway and inventory; collects wrong answers."""

    def __init__(self, gateway, inventory, db):
        self.ports = {"gateway": gateway.port, "inventory": inventory.port}
        self.services = (gateway, inventory)
        self.db = db
        self.problems = []
        self.sent = collections.Counter()
        _, _, victim = helpers.call(
            inventory.url, "POST", "/api/movies", {"title": "Victim"}
        )
        self.victim = victim["id"]
        self.before = movies_state(db)

    def expect_error(self, name, data, what, statuses=range(400, 500), head=False):
        """Send data to one service; note it unless a JSON error with a status in
        statuses comes back."""
        reply = exchange(self.ports[name], data, head)
        self.sent[name] += 1
        if reply is None:
            self.problems.append((name, what, "closed without an answer"))
        elif reply.status not in statuses:
            self.problems.append((name, what, reply))
        elif not head and not (
            reply.headers.get("content-type") == "application/json"
            and isinstance(reply.json, dict)
            and reply.json.get("error")
        ):
            self.problems.append((name, what, "not a JSON error", reply))
        return reply

    def finish(self, added=()):
        """Both services up, the table as before plus the valid requests' rows."""
        for service in self.services:
            if service.proc.poll() is not None:
                self.problems.append((service.name, "exited", service.tail(5)))
        status = helpers.call(
            f"http://127.0.0.1:{self.ports['gateway']}", "GET", "/health"
        )[0]
        if status != 200:
            self.problems.append(("gateway", "/health afterwards", status))
        after = movies_state(self.db)
        if after[: len(self.before)] != self.before:
            self.problems.append(("movies", "changed", self.before, after))
        extra = [title for _, title, _ in after[len(self.before) :]]
        if extra != list(added):
            self.problems.append(("movies", "rows added", extra))
        assert not self.problems, "\n".join(map(repr, self.problems))


@pytest.fixture
def hostile(procs, inventory, queue, clean_movies):
    gateway = start_gateway(procs, inventory.port, queue)
    return Hostile(gateway, inventory, clean_movies)


def test_hostile_bodies_and_lying_lengths(hostile):
    victim = hostile.victim
    liars = concurrent.futures.ThreadPoolExecutor(6)
    lying_up = {  # Content-Length larger than what is sent: wait, then give up
        (name, what): liars.submit(exchange, port, data)
        for name, port in hostile.ports.items()
        for what, data in (
            ("POST", post_raw("/api/movies", b'{"title": "liar"}', length=1000)),
            (
                "PUT",
                post_raw(
                    f"/api/movies/{victim}",
                    b'{"title": "liar"}',
                    method=b"PUT",
                    length=500,
                ),
            ),
        )
    }
    lying_up["gateway", "billing"] = liars.submit(
        exchange,
        hostile.ports["gateway"],
        post_raw("/api/billing", json.dumps(order(7)).encode(), length=900),
    )
    for name in hostile.ports:
        for body in BAD_MOVIE_BODIES:
            hostile.expect_error(name, post_raw("/api/movies", body), body[:40])
        for body in (b"{}", b'{"title": "abc', b'{"description": 5}', b"[" * 50_000):
            data = post_raw(f"/api/movies/{victim}", body, method=b"PUT")
            hostile.expect_error(name, data, ("PUT", body[:40]))
        big = b'{"title": "' + b"x" * (2 * MIB) + b'"}'
        hostile.expect_error(name, post_raw("/api/movies", big), "2 MiB", {413})
        data = post_raw("/api/movies", b'{"title": "x"}', b"text/plain")
        hostile.expect_error(name, data, "text/plain", {415})
        for length in (b"-5", b"abc", b"1e3", b"+14", b"0x0e"):
            data = (
                b"POST /api/movies HTTP/1.1\r\nContent-Length: "
                + length
                + b'\r\n\r\n{"title": "x"}'
            )
            hostile.expect_error(name, data, ("Content-Length", length))
        chunked = (
            b"POST /api/movies HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
            b'e\r\n{"title": "ch"}\r\n0\r\n\r\n'
        )
        hostile.expect_error(name, chunked, "chunked", {400, 411})
        # Content-Length lying downwards: the rest is read as a next request
        conn = RawConnection(hostile.ports[name])
        conn.send(post_raw("/api/movies", b'{"title": "smaller"}\r\n\r\n', length=5))
        first, second = conn.reply(), conn.reply()
        conn.close()
        hostile.sent[name] += 1
        if not (first and first.status == 400 and first.json.get("error")):
            hostile.problems.append((name, "short Content-Length", first))
        if second is not None and not (
            isinstance(second.json, dict) and second.json.get("error")
        ):
            hostile.problems.append((name, "after short Content-Length", second))
    for (name, what), future in lying_up.items():
        reply = future.result()
        hostile.sent[name] += 1
        if reply is not None and (
            reply.status != 408
            or not reply.json.get("error")
            or not REQUEST_TIMEOUT - 1 <= reply.seconds <= REQUEST_TIMEOUT + 6
        ):
            hostile.problems.append((name, "Content-Length too large", what, reply))
    liars.shutdown()
    cut = max(f.result().seconds for f in lying_up.values() if f.result())
    hostile.finish()
    assert helpers.queue_depth(queue_of(hostile)) == 0
    figure(
        "hostile.bodies",
        gateway_requests=hostile.sent["gateway"],
        inventory_requests=hostile.sent["inventory"],
        all_4xx_json=True,
        lying_length_answered_408_after_s=f"{cut:.1f}",
        rows_changed=0,
    )


def queue_of(hostile):
    """The hostile gateway's queue (its env)."""
    return hostile.services[0].env["RABBITMQ_QUEUE"]


def test_hostile_orders_are_400_and_never_queued(hostile):
    for body in BAD_ORDER_BODIES:
        hostile.expect_error("gateway", post_raw("/api/billing", body), body[:80])
    big = json.dumps({**order(1), "pad": "x" * 70_000}).encode()
    hostile.expect_error("gateway", post_raw("/api/billing", big), "70 KB", {413})
    hostile.finish()
    assert helpers.queue_depth(queue_of(hostile)) == 0
    gateway_url = hostile.services[0].url
    assert helpers.call(gateway_url, "POST", "/api/billing", order(9))[0] == 200
    assert helpers.queue_depth(queue_of(hostile)) == 1
    figure(
        "hostile.orders",
        requests=hostile.sent["gateway"],
        all_4xx_json=True,
        queued=0,
    )


def test_hostile_sql_injection_is_stored_literally(hostile):
    added = []
    for name, port in hostile.ports.items():
        url = f"http://127.0.0.1:{port}"
        for text in SQL_INJECTIONS:
            status, _, movie = helpers.call(
                url, "POST", "/api/movies", {"title": text, "description": text}
            )
            if status != 201 or movie["title"] != text or movie["description"] != text:
                hostile.problems.append((name, "create", text, status, movie))
                continue
            added.append(text)
            status, _, same = helpers.call(url, "GET", f"/api/movies/{movie['id']}")
            if status != 200 or same != movie:
                hostile.problems.append((name, "get", text, status, same))
            query = urllib.parse.quote(text, safe="")
            status, _, found = helpers.call(url, "GET", f"/api/movies?title={query}")
            if (
                status != 200
                or movie not in found
                or not all(text.lower() in m["title"].lower() for m in found)
            ):
                hostile.problems.append((name, "search", text, status, found))
            status, _, movie = helpers.call(
                url, "PUT", f"/api/movies/{movie['id']}", {"title": f"{text}!"}
            )
            if status != 200 or movie["title"] != f"{text}!":
                hostile.problems.append((name, "update", text, status, movie))
            added[-1] = f"{text}!"
            hostile.sent[name] += 4
        for query in BAD_QUERIES:
            data = get_raw(f"/api/movies?{query}".encode())
            hostile.expect_error(name, data, query)
    hostile.finish(added)
    assert helpers.rows(hostile.db, "SELECT count(*) FROM movies")[0][0] == 1 + len(
        added
    )
    figure(
        "hostile.sql_injection",
        injections=len(SQL_INJECTIONS),
        stored_literally=len(added),
        bad_query_strings=len(BAD_QUERIES),
        tables_intact=True,
    )


def test_hostile_paths_and_methods_are_4xx(hostile):
    for name in hostile.ports:
        for path in BAD_PATHS:
            for method in (b"GET", b"PUT", b"DELETE"):
                if method == b"PUT":
                    data = post_raw(path, b'{"title": "x"}', method=method)
                else:
                    data = get_raw(path.encode(), method)
                reply = hostile.expect_error(name, data, (method, path))
                if reply and (b"root:" in reply.body or b"PASSWORD" in reply.body):
                    hostile.problems.append((name, "leak", path, reply))
        for target in RAW_TARGETS:
            # raw bytes a lax client may send: a JSON answer, never a server error
            reply = exchange(hostile.ports[name], get_raw(target))
            hostile.sent[name] += 1
            if reply is None or reply.status >= 500 or reply.json is None:
                hostile.problems.append((name, target, reply))
        for method in ODD_METHODS:
            for path in (b"/api/movies", f"/api/movies/{hostile.victim}".encode()):
                hostile.expect_error(name, get_raw(path, method), (method[:10], path))
        data = get_raw(b"/api/movies", b"HEAD")
        hostile.expect_error(name, data, "HEAD", head=True)
    for path in (b"/api/billing", b"/health"):
        for method in ODD_METHODS:
            data = get_raw(path, method)
            hostile.expect_error("gateway", data, (method[:10], path))
    hostile.finish()
    figure(
        "hostile.paths_methods",
        gateway_requests=hostile.sent["gateway"],
        inventory_requests=hostile.sent["inventory"],
        all_4xx_json=True,
    )


def test_hostile_request_lines_and_header_floods(hostile):
    for name, port in hostile.ports.items():
        for data in MALFORMED:
            conn = RawConnection(port)
            conn.send(data)
            reply = conn.reply()
            closed = conn.closed()
            conn.close()
            hostile.sent[name] += 1
            # A request line that is not HTTP/1.x may get a bare (HTTP/0.9) body.
            if (
                reply is None
                or not (isinstance(reply.json, dict) and reply.json.get("error"))
                or (
                    not (reply.status is None or 400 <= reply.status < 500)
                    and reply.status != 505
                )
            ):
                hostile.problems.append((name, data[:30], reply))
            if not closed:
                hostile.problems.append((name, data[:30], "connection left open"))
        for data in HEADER_FLOODS:
            hostile.expect_error(name, data, data[:30])
    hostile.finish()
    figure(
        "hostile.request_lines",
        gateway_requests=hostile.sent["gateway"],
        inventory_requests=hostile.sent["inventory"],
        all_errors_json_and_closed=True,
    )


# --- 10. Poison messages ---

POISON = {
    "not_json": [b"not json", b"\xff\xfe\x00 garbage", b"", b'{"user_id": 1,'],
    "wrong_types": [
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"user_id": "abc", "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": [1], "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": true, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": {"a": 1}}',
    ],
    "huge_values": [
        b'{"user_id": 2147483648, "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1e30, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e30}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e999999999}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": ' + b"9" * 5000 + b"}",
    ],
    "mib_body": [
        b"x" * MIB,
        b"[" * MIB,
        json.dumps(list(range(150_000))).encode()[:MIB],
    ],
    "message_id_nul": ["poison\x00id"],
    "message_id_binary": [b"\xff\xfe\xfd"],
}


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_message_never_blocks_orders_behind_it(procs, queue, orders_db, kind):
    first = 5_000_000 + list(POISON).index(kind) * 1000
    good = [order(first + i) for i in range(3)]
    if kind.startswith("message_id"):
        # a valid order with a message_id PostgreSQL text cannot hold
        poison = [json.dumps(order(first + 500))]
        poison_ids = POISON[kind]
    else:
        poison = POISON[kind]
        poison_ids = [f"poison-{kind}-{i}" for i in range(len(poison))]
    bodies = [good[0], *poison, good[1], *poison, good[2]]
    ids = ["g0", *poison_ids, "g1", *[None] * len(poison), "g2"]
    helpers.publish_raw(
        queue, bodies, [f"{kind}-{m}" if m in ("g0", "g1", "g2") else m for m in ids]
    )
    start = time.monotonic()
    billing = procs("billing", helpers.billing_env(queue))
    try:
        helpers.wait_for(
            lambda: len(stored_users(first, first + 2)) == 3 or billing.proc.poll(),
            timeout=20,
            what="the good orders behind the poison",
        )
    finally:
        alive = billing.proc.poll() is None
    assert alive, f"billing died on {kind}: {billing.tail(3)}"
    seconds = time.monotonic() - start
    assert stored_users(first, first + 2) == {first: 1, first + 1: 1, first + 2: 1}
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    assert billing.stop() == 0
    dead = helpers.queue_depth(f"{queue}.dead")
    stored_poison = len(stored_users(first + 3, first + 999))
    assert dead + stored_poison == 2 * len(poison), (dead, stored_poison)
    assert helpers.queue_depth(queue) == 0
    figure(
        f"poison.{kind}",
        poison=2 * len(poison),
        good=3,
        stored_good=3,
        dead_lettered=dead,
        stored_poison=stored_poison,
        blocked=0,
        seconds=f"{seconds:.1f}",
    )
