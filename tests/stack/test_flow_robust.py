"""Lists that cannot exhaust memory or the pool; a publisher that cannot die.

What an outside review found: a page of huge movies took hundreds of MiB; four
clients that do not read held every database connection; an exception while
connecting ended the publisher thread for good (and each reconnect leaked
descriptors); a queue deleted under a running gateway was never declared again.
"""

import concurrent.futures
import errno
import http.client
import json
import os
import re
import socket
import subprocess
import time
import types

import helpers
import pika
import pytest
import yaml
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gateway
import inventory
from inventory import POOL_SIZE

MIB = 1024 * 1024
ORDER = {"user_id": 1, "number_of_items": 2, "total_amount": "3.50"}
ALLOWED_CONTROLS = "\t\n\r"


@pytest.fixture
def stack(clean_movies, queue):
    """A fresh inventory and gateway of the test's own: (inventory, gateway)."""
    inventory_port, gateway_port = helpers.free_port(), helpers.free_port()
    inv = helpers.Service(
        "inventory", helpers.inventory_env(inventory_port), inventory_port
    )
    gw = helpers.Service(
        "gateway",
        helpers.gateway_env(gateway_port, inventory_port, queue),
        gateway_port,
    )
    inv.start()
    gw.start()
    try:
        helpers.wait_for(
            lambda: helpers.call(gw.url, "GET", "/health")[0] == 200, what="health"
        )
        yield inv, gw
    finally:
        gw.stop()
        inv.stop()


def peak_mib(pid):
    """The process's peak resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def read_all(port, path):
    """GET path; return (status, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- 8. A list's memory is bounded ---


def test_lists_of_huge_movies_take_bounded_memory(stack):
    # 61 KB of JSON per movie (10,000 control characters, escaped as \u0001),
    # stored straight in the table as an older version could have.
    inv, gw = stack
    with helpers.admin_connect(inv.env["INVENTORY_DB_NAME"]) as conn:
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT 'Huge ' || i, repeat(chr(1), 10000)"
            " FROM generate_series(1, 2000) AS i"
        )
    paths = [
        "/api/movies?limit=1000",
        "/api/movies?limit=1000&offset=1000",
        "/api/movies",
        "/api/movies?title=huge&limit=1000&offset=500",
    ]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: read_all(gw.port, p), paths))
    seconds = time.monotonic() - start
    expected = [range(1, 1001), range(1001, 2001), range(1, 2001), range(501, 1501)]
    for path, (status, body), ids in zip(paths, answers, expected, strict=True):
        movies = json.loads(body)
        assert status == 200 and [m["id"] for m in movies] == list(ids), path
        assert movies[-1]["description"] == "\x01" * 10_000
    peaks = {s.name: peak_mib(s.proc.pid) for s in (inv, gw)}
    print(f"\nFIGURE flow.list_memory: peak_mib={peaks} seconds={seconds:.1f}")
    assert peaks["inventory"] < 120 and peaks["gateway"] < 120, peaks


@pytest.fixture(scope="module")
def mixed_movies(movies_db):
    """300 movies of mixed sizes (0 to 61 KB of JSON) in movies_test: their rows."""
    with helpers.admin_connect(movies_db) as conn:
        conn.execute("TRUNCATE movies RESTART IDENTITY")
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT CASE WHEN i % 3 = 0 THEN 'Big ' ELSE 'small ' END || i,"
            "  CASE WHEN i % 3 = 0 THEN repeat(chr(1), 10000 - i)"
            "       WHEN i % 7 = 0 THEN repeat('\u00e9\"', 2500) ELSE 'd' || i END"
            " FROM generate_series(1, 300) AS i"
        )
        return conn.execute(
            "SELECT id, title, description FROM movies ORDER BY id"
        ).fetchall()


@settings(max_examples=40, deadline=None)
@given(
    limit=st.none() | st.integers(1, 1000),
    offset=st.integers(0, 320),
    title=st.sampled_from([None, "big", "SMALL 1", "2", "zzz"]),
)
def test_pages_cut_by_bytes_add_up_to_the_table(
    inventory, mixed_movies, limit, offset, title
):
    # Pages are cut wherever the byte budget ends; the answer is the same list
    # PostgreSQL holds, in order, whatever the limit, offset and search.
    query = {"limit": limit, "offset": offset or None, "title": title}
    path = "/api/movies?" + "&".join(f"{k}={v}" for k, v in query.items() if v)
    status, body = read_all(inventory.port, path.replace(" ", "%20"))
    expected = [
        {"id": i, "title": t, "description": d}
        for i, t, d in mixed_movies
        if title is None or title.lower() in t.lower()
    ][offset:]
    expected = expected if limit is None else expected[:limit]
    assert status == 200 and json.loads(body) == expected


@pytest.mark.parametrize("char", ["\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f"])
def test_control_characters_in_movies_are_400(inventory, clean_movies, char):
    movie = helpers.call(inventory.url, "POST", "/api/movies", {"title": "ok"})[2]
    for method, path, body in (
        ("POST", "/api/movies", {"title": f"a{char}b"}),
        ("POST", "/api/movies", {"title": "t", "description": f"a{char}b"}),
        ("PUT", f"/api/movies/{movie['id']}", {"description": char * 10_000}),
    ):
        status, _, answer = helpers.call(inventory.url, method, path, body)
        assert status == 400 and "control character" in answer["error"], body
    assert helpers.call(inventory.url, "GET", f"/api/movies/{movie['id']}")[2] == movie
    kept = {"title": "tab\there", "description": "line\r\nnext\tcol"}
    status, _, created = helpers.call(inventory.url, "POST", "/api/movies", kept)
    assert status == 201 and created == {"id": created["id"], **kept}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x3000), max_size=40))
def test_movie_text_is_accepted_only_without_control_characters(text):
    try:
        title, description = inventory.validate_movie(
            {"title": f"x{text}", "description": text}, partial=False
        )
    except inventory.ApiError as exc:
        assert exc.status == 400
        assert any(c < " " and c not in ALLOWED_CONTROLS for c in text), text
        return
    assert not any(c < " " and c not in ALLOWED_CONTROLS for c in description)
    assert (title, description) == (f"x{text}", text)


def _accepted(field, value, limit, required):
    """Whether inventory accepts value for a stored field."""
    try:
        inventory.check_text(value, field, limit, required)
    except inventory.ApiError:
        return False
    return True


SCHEMAS = yaml.safe_load((helpers.ROOT / "openapi.yaml").read_text())["components"][
    "schemas"
]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x3100), max_size=12))
def test_openapi_patterns_say_what_inventory_accepts(text):
    title = re.compile(SCHEMAS["Title"]["pattern"])
    description = re.compile(SCHEMAS["Description"]["pattern"])
    assert _accepted("title", text, 255, True) == bool(title.search(text))
    assert _accepted("description", text, 10_000, False) == bool(
        description.search(text)
    )


# --- 9. Clients that do not read hold no database connection ---


def stalled_reader(port, path):
    """A connection that asks for path and never reads the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_clients_that_do_not_read_leave_the_pool_free(stack):
    inv, gw = stack
    with helpers.admin_connect(inv.env["INVENTORY_DB_NAME"]) as conn:
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT 'Slow ' || i, repeat('x', 2000)"
            " FROM generate_series(1, 20000) AS i"
        )
    stalled = [stalled_reader(inv.port, "/api/movies") for _ in range(5)]
    stalled += [stalled_reader(gw.port, "/api/movies") for _ in range(3)]
    try:
        time.sleep(2)  # their answers fill the socket buffers; the writes block
        answers = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for service in (inv, gw):
                for method, path, body in (
                    ("GET", "/api/movies/7", None),
                    ("GET", "/api/movies?title=slow%2012&limit=3", None),
                    ("POST", "/api/movies", {"title": "During"}),
                ):
                    begun = time.monotonic()
                    status, _, answer = helpers.call(service.url, method, path, body)
                    answers.append((status, time.monotonic() - begun, path, answer))
    finally:
        for sock in stalled:
            sock.close()
    slowest = max(seconds for _, seconds, _, _ in answers)
    print(f"\nFIGURE flow.stalled_readers: probes={len(answers)} max_s={slowest:.2f}")
    wrong = [a for a in answers if a[0] not in (200, 201) or a[1] >= 1]
    assert not wrong, wrong[:5]


def test_exhausted_pool_is_503_busy_not_unavailable(inventory, clean_movies):
    # Every pooled connection waits on a lock: the next request finds none.
    movie = helpers.call(inventory.url, "POST", "/api/movies", {"title": "Locked"})[2]
    path = f"/api/movies/{movie['id']}"
    with helpers.admin_connect(clean_movies) as admin:
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE movies IN ACCESS EXCLUSIVE MODE")
        with concurrent.futures.ThreadPoolExecutor(POOL_SIZE) as pool:
            held = [
                pool.submit(helpers.call, inventory.url, "GET", path)
                for _ in range(POOL_SIZE)
            ]
            time.sleep(1)
            status, headers, body = helpers.call(inventory.url, "GET", path)
            admin.execute("ROLLBACK")
            assert [f.result()[0] for f in held] == [200] * POOL_SIZE
    assert status == 503 and body == {"error": "database busy, try again"}
    assert headers["Retry-After"] == "1"


# --- 10. The publisher recovers from anything, without leaking ---


class FailingSocketpair:
    """pika's socketpair, out of file descriptors until release() is called."""

    def __init__(self, real):
        self.real, self.calls, self.failing = real, 0, True

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.real(*args, **kwargs)

    def release(self):
        self.failing = False


def test_publisher_survives_running_out_of_descriptors(monkeypatch, queue):
    fault = FailingSocketpair(pika.compat.nonblocking_socketpair)
    monkeypatch.setattr(pika.compat, "nonblocking_socketpair", fault)
    publisher = gateway.Publisher(helpers.rabbit_params(), queue)
    publisher.start()
    try:
        helpers.wait_for(
            lambda: fault.calls >= 2, timeout=10, what="two failed attempts"
        )
        status, body, _ = gateway.health(None, [HealthyUpstream()], publisher)
        report = json.loads(body)
        assert status == 503 and "Too many open files" in report["rabbitmq"], report
        fault.release()
        helpers.wait_for(
            publisher.ready.is_set, timeout=15, what="the publisher to recover"
        )
        publisher.publish(json.dumps(ORDER).encode(), "after-emfile")
        assert helpers.queue_depth(queue) == 1
        assert gateway.health(None, [HealthyUpstream()], publisher).status == 200
    finally:
        stop = getattr(publisher, "stop", None)
        if stop:
            stop()


class HealthyUpstream:
    """An inventory that always answers 200."""

    host, port = "inventory", 8080

    def request(self, method, path, body, headers):
        return 200, [], b"[]"


def amqp_port(pid):
    """The local port of the process's connection to RabbitMQ (or None)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dport = :5672"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        if f"pid={pid}," in line:
            return int(line.split()[2].rsplit(":", 1)[1])
    return None


def close_amqp_connection(pid):
    """Have RabbitMQ close the process's connection; return the old local port."""
    port = helpers.wait_for(
        lambda: amqp_port(pid), what="the gateway's AMQP connection"
    )
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == str(port):
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", fields[0], "test reconnect"],
                check=True,
                capture_output=True,
            )
            return port
    raise AssertionError(f"no RabbitMQ connection from port {port}")


def test_reconnects_do_not_leak_descriptors(stack):
    _, gw = stack
    pid = gw.proc.pid
    assert helpers.call(gw.url, "POST", "/api/billing", ORDER)[0] == 200
    before = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(6):
        old = close_amqp_connection(pid)
        helpers.wait_for(
            lambda old=old: (
                amqp_port(pid) not in (None, old)
                and helpers.call(gw.url, "GET", "/health")[0] == 200
            ),
            what="the gateway to reconnect",
        )
    assert helpers.call(gw.url, "POST", "/api/billing", ORDER)[0] == 200
    time.sleep(0.5)
    after = len(os.listdir(f"/proc/{pid}/fd"))
    print(f"\nFIGURE flow.reconnect_fds: reconnects=6 fds={before}->{after}")
    assert after <= before + 2, (before, after)


# --- 11. A deleted queue is declared again ---


def test_deleted_queue_is_declared_again(stack):
    _, gw = stack
    queue = gw.env["RABBITMQ_QUEUE"]
    helpers.delete_queues(queue)
    status, _, body = helpers.call(gw.url, "POST", "/api/billing", ORDER)
    assert (status, body) == (200, {"message": "Message posted"})
    assert helpers.queue_depth(queue) == 1
    conn, channel = helpers.rabbit_channel()
    try:
        # declared as before: durable, dead-lettering to <queue>.dead
        channel.queue_declare(
            queue, durable=True, passive=False, arguments=gateway.queue_arguments(queue)
        )
        channel.queue_declare(f"{queue}.dead", durable=True, passive=True)
    finally:
        conn.close()


def test_publishes_during_a_redeclare_all_answer(stack):
    _, gw = stack
    queue = gw.env["RABBITMQ_QUEUE"]
    helpers.delete_queues(queue)

    def post(i):
        order = {**ORDER, "user_id": i + 1}
        return helpers.call(gw.url, "POST", "/api/billing", order)[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, range(64)))
    assert statuses == [200] * 64
    assert helpers.queue_depth(queue) == 64


class RecordingChannel:
    """A channel that declares at once and records what is published."""

    def __init__(self):
        self.declared, self.published = [], []

    def queue_declare(self, queue, durable, arguments=None, callback=None):
        self.declared.append(queue)
        callback(None)

    def basic_publish(self, exchange, routing_key, body, properties, mandatory):
        self.published.append((routing_key, body, properties.message_id, mandatory))


@pytest.mark.parametrize("second", ["routed", "returned"])
def test_a_returned_publish_is_sent_once_more_after_declaring(second):
    session = gateway.Publisher(params=None, queue="q")._session
    session.confirms.channel = channel = RecordingChannel()
    future = concurrent.futures.Future()
    properties = pika.BasicProperties(message_id="m1", delivery_mode=2)
    session.confirms.send(gateway._Outgoing(future, b"{}", properties))
    session.confirms.on_return(channel, None, properties, b"{}")
    session.on_delivery_confirmation(
        types.SimpleNamespace(method=pika.spec.Basic.Ack(1))
    )
    assert channel.declared == ["q.dead", "q"] and not future.done()
    assert channel.published == [("q", b"{}", "m1", True)] * 2
    if second == "returned":
        session.confirms.on_return(channel, None, properties, b"{}")
    session.on_delivery_confirmation(
        types.SimpleNamespace(method=pika.spec.Basic.Ack(2))
    )
    if second == "returned":
        assert isinstance(future.exception(), ConnectionError)
    else:
        assert future.result() is None
    assert channel.declared == ["q.dead", "q"]  # declared again once, not twice
