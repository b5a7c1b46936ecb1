"""What an operator sees: split logs, request and message ids, a truthful /health.

- INFO goes to stdout, WARNING and above to stderr, in all three services;
- each request gets an X-Request-Id that the gateway returns, forwards to
  inventory and logs, as inventory does; an order's X-Message-Id is the id
  billing logs when it stores or dead-letters the order;
- the gateway's /health says "degraded" (still 200) while nothing consumes the
  billing queue, reading the queue at most about once a second; inventory has
  a /health of its own.
"""

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import time

import helpers
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from rawhttp import FakeUpstream
from rawhttp import exchange
from rawhttp import json_answer

import gateway as gateway_module

ORDER = {"user_id": 7, "number_of_items": 2, "total_amount": "12.50"}
SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
LOG_LINE = re.compile(r"\S+ \S+ (\w+) (\w+) ")  # date time name LEVEL ...


class SplitService(helpers.Service):
    """A service whose stdout and stderr go to two files."""

    def start(self, wait=True):
        """Start the process and, for HTTP services, wait until it listens."""
        self.err_path = self.log_path.with_suffix(".err")
        with open(self.log_path, "a") as out, open(self.err_path, "a") as err:
            self.proc = subprocess.Popen(
                [helpers.PYTHON, str(helpers.ROOT / f"{self.name}.py")],
                cwd=helpers.ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 15
        while wait and self.port and time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited: {self.both()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        assert not (wait and self.port), f"{self.name} did not listen: {self.both()}"
        return self

    def out(self):
        """What the service wrote to stdout."""
        return self.log_path.read_text(errors="replace")

    def err(self):
        """What the service wrote to stderr."""
        return self.err_path.read_text(errors="replace")

    def both(self):
        return f"stdout:\n{self.out()}\nstderr:\n{self.err()}"


def levels(text):
    """The levels of the log lines in text (tracebacks' lines are skipped)."""
    return {m.group(2) for m in map(LOG_LINE.match, text.splitlines()) if m}


@pytest.fixture
def procs():
    """Start SplitServices; stop them all at the end."""
    started = []

    def start(name, env, port=None, wait=True):
        service = SplitService(name, env, port).start(wait)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


# --- 6. Logs: INFO to stdout, warnings to stderr ---


def test_info_goes_to_stdout_and_warnings_to_stderr(procs, queue, movies_db):
    closed = helpers.free_port()  # nothing listens there
    inventory_port, gateway_port = helpers.free_port(), helpers.free_port()
    inventory = procs(
        "inventory",
        {**helpers.inventory_env(inventory_port), "INVENTORY_DB_PORT": str(closed)},
        inventory_port,
    )
    gateway = procs(
        "gateway", helpers.gateway_env(gateway_port, closed, queue), gateway_port
    )
    billing = procs(
        "billing", {**helpers.billing_env(queue), "RABBITMQ_PORT": str(closed)}
    )
    assert helpers.call(gateway.url, "GET", "/api/movies/1")[0] == 502  # a warning
    assert helpers.call(inventory.url, "GET", "/api/movies/1")[0] == 503  # a warning
    helpers.wait_for(lambda: "WARNING" in billing.err(), what="billing's warning")
    for service in (inventory, gateway, billing):
        service.stop()
        out, err = service.out(), service.err()
        assert "INFO" in levels(out), service.both()
        assert levels(out) <= {"DEBUG", "INFO"}, service.both()
        assert levels(err) == {"WARNING"}, service.both()
        assert "Traceback" not in err, service.both()


# --- 7. Request ids ---


def request_id(headers):
    """The one X-Request-Id of a response."""
    values = [v for k, v in headers.items() if k.lower() == "x-request-id"]
    assert len(values) == 1, headers
    return values[0]


def test_every_answer_has_a_request_id(server):
    seen = set()
    for method, path, body in (
        ("GET", "/api/movies?limit=1", None),
        ("GET", "/api/movies/999999", None),
        ("GET", "/nope", None),
        ("DELETE", "/health", None),
        ("POST", "/api/billing", {"user_id": "x"}),
        ("GET", "/health", None),
        ("GET", "/openapi.yaml", None),
    ):
        _, headers, _ = helpers.call(server.url, method, path, body)
        rid = request_id(headers)
        assert SANE_ID.fullmatch(rid) and rid not in seen, (method, path, rid)
        seen.add(rid)
    port = server.port
    for raw in (
        b"GET /api/movies HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",  # 400
        b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",  # 505
        b"POST /api/billing HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
    ):
        answer = exchange(port, raw)
        assert answer.status >= 400
        assert SANE_ID.fullmatch(answer.header("x-request-id") or ""), answer


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.from_regex(SANE_ID, fullmatch=True),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=140),
        st.text(alphabet="abc-", min_size=120, max_size=140),
    )
)
def test_a_sane_client_id_is_kept_any_other_replaced(server, sent):
    _, headers, _ = helpers.call(
        server.url, "GET", "/nope", headers={"X-Request-Id": sent}
    )
    rid = request_id(headers)
    assert SANE_ID.fullmatch(rid)
    assert (rid == sent) == bool(SANE_ID.fullmatch(sent)), (sent, rid)


def test_two_request_ids_are_replaced(server):
    port = server.port
    answer = exchange(
        port,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n",
    )
    assert answer.header("x-request-id") not in ("a", "b", None), answer


def test_the_request_id_is_forwarded_to_inventory(queue):
    fake = FakeUpstream(lambda request: json_answer(b'{"id": 1}'))
    port = helpers.free_port()
    gateway = helpers.Service(
        "gateway", helpers.gateway_env(port, fake.port, queue), port
    ).start()
    try:
        _, headers, _ = helpers.call(
            gateway.url, "GET", "/api/movies/1", headers={"X-Request-Id": "abc.1-_Z"}
        )
        assert request_id(headers) == "abc.1-_Z"
        _, headers, _ = helpers.call(
            gateway.url, "GET", "/api/movies/2", headers={"X-Request-Id": "bad id"}
        )
        made = request_id(headers)
        forwarded = [r.values("x-request-id") for r in fake.requests]
        assert forwarded == [["abc.1-_Z"], [made]], fake.requests
    finally:
        gateway.stop()
        fake.close()


def test_one_order_followed_through_the_three_logs(procs, queue, movies_db, orders_db):
    inventory_port, gateway_port = helpers.free_port(), helpers.free_port()
    debug = {"LOG_LEVEL": "DEBUG"}  # with the access lines
    inventory = procs(
        "inventory", {**helpers.inventory_env(inventory_port), **debug}, inventory_port
    )
    gateway = procs(
        "gateway",
        {**helpers.gateway_env(gateway_port, inventory_port, queue), **debug},
        gateway_port,
    )
    billing = procs("billing", helpers.billing_env(queue))
    # The port opens before the publisher has connected.
    health_where(gateway, lambda b: b["rabbitmq"] == "ok", "the gateway to connect")
    _, headers, _ = helpers.call(gateway.url, "GET", "/api/movies/987654321")
    movie_rid = request_id(headers)
    status, headers, body = helpers.call(
        gateway.url, "POST", "/api/billing", ORDER, {"X-Request-Id": "order-1"}
    )
    assert status == 200 and body == {"message": "Message posted"}
    assert request_id(headers) == "order-1"
    message_id = headers["X-Message-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", message_id), headers
    helpers.wait_for(
        lambda: message_id in billing.out(), what="billing to log the order"
    )
    helpers.publish_raw(queue, [b"not json"], ["bad-one"], declare=False)
    helpers.wait_for(
        lambda: "bad-one" in billing.err(), what="billing's dead-letter line"
    )
    (stored,) = [line for line in billing.out().splitlines() if message_id in line]
    assert "stored order 1:" in stored, stored
    (dead,) = [line for line in billing.err().splitlines() if "bad-one" in line]
    assert "dead-letter" in dead, dead
    gateway_lines = [line for line in gateway.out().splitlines() if "order-1" in line]
    assert any(message_id in line for line in gateway_lines), gateway.both()
    assert any("POST /api/billing 200" in line for line in gateway_lines), (
        gateway.both()
    )
    (access,) = [line for line in inventory.out().splitlines() if movie_rid in line]
    assert "GET /api/movies/987654321 404" in access, access
    print("\n--- gateway ---\n" + "\n".join(gateway_lines))
    print("\n".join(x for x in gateway.out().splitlines() if movie_rid in x))
    print("--- inventory ---\n" + access)
    print("--- billing ---\n" + stored + "\n" + dead)


def test_access_line_at_debug_only(gateway, inventory, queue, procs):
    helpers.call(
        gateway.url, "GET", "/api/movies/123456", headers={"X-Request-Id": "acc-0"}
    )
    helpers.call(gateway.url, "POST", "/api/billing", ORDER, {"X-Request-Id": "acc-0"})
    # The order's line is written at INFO; the access line (18% of W1) is not.
    helpers.wait_for(
        lambda: "request acc-0" in gateway.tail(300), what="the order's line"
    )
    assert not [x for x in gateway.tail(300).splitlines() if x.endswith("ms acc-0")]
    port = helpers.free_port()
    env = {**helpers.gateway_env(port, inventory.port, queue), "LOG_LEVEL": "debug"}
    debug = procs("gateway", env, port)
    helpers.call(
        debug.url, "GET", "/api/movies/123456", headers={"X-Request-Id": "acc-1"}
    )
    line = helpers.wait_for(
        lambda: [x for x in debug.out().splitlines() if "acc-1" in x],
        what="the access line",
    )[0]
    assert re.search(r" DEBUG GET /api/movies/123456 404 \d+\.\dms acc-1$", line), line
    assert "acc-1" not in debug.err()


# --- 8. /health ---


def health_where(gateway, predicate, what):
    """Poll the gateway's /health until predicate(body); return (status, body)."""

    def check():
        status, _, body = helpers.call(gateway.url, "GET", "/health")
        return predicate(body) and (status, body)

    return helpers.wait_for(check, what=what)


def test_health_says_whether_billing_consumes(procs, queue, movies_db, billing_db):
    inventory_port, gateway_port = helpers.free_port(), helpers.free_port()
    procs("inventory", helpers.inventory_env(inventory_port), inventory_port)
    gateway = procs(
        "gateway",
        helpers.gateway_env(gateway_port, inventory_port, queue),
        gateway_port,
    )
    health_where(gateway, lambda b: b["rabbitmq"] == "ok", "the gateway to connect")
    assert helpers.call(gateway.url, "POST", "/api/billing", ORDER)[0] == 200
    status, body = health_where(
        gateway, lambda b: b.get("queue", {}).get("ready") == 1, "the order queued"
    )
    assert status == 200 and body == {
        "status": "degraded",
        "inventory": "ok",
        "rabbitmq": "ok",
        "billing": "not consuming: no consumer on the queue",
        "queue": {"name": queue, "consumers": 0, "ready": 1},
        "inventories": {f"127.0.0.1:{inventory_port}": "ok"},
        "rabbitmq_node": "127.0.0.1",
    }
    billing = procs("billing", helpers.billing_env(queue))
    status, body = health_where(
        gateway, lambda b: b["status"] == "ok", "/health to see billing"
    )
    assert status == 200 and body["billing"] == "ok", body
    assert body["queue"]["consumers"] == 1, body
    health_where(gateway, lambda b: b["queue"]["ready"] == 0, "the order stored")
    billing.stop()
    status, body = health_where(
        gateway, lambda b: b["status"] == "degraded", "/health to see billing gone"
    )
    assert status == 200 and body["queue"]["consumers"] == 0, body
    assert body["billing"].startswith("not consuming"), body


def test_health_reads_the_queue_at_most_about_once_a_second(queue):
    publisher = gateway_module.Publisher(helpers.rabbit_params(), queue)
    probes = []
    real = publisher._probe.open_channel

    def counted(future):
        probes.append(time.monotonic())
        real(future)

    publisher._probe.open_channel = counted
    publisher.start()
    try:
        helpers.wait_for(publisher.ready.is_set, what="the publisher to connect")
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: publisher.queue_state(), range(200)))
        assert answers == [(0, 0)] * 200
        elapsed = time.monotonic() - start
        assert len(probes) <= 2 + elapsed / gateway_module.QUEUE_STATE_AGE, probes
        time.sleep(gateway_module.QUEUE_STATE_AGE + 0.1)
        assert publisher.queue_state() == (0, 0) and len(probes) >= 2
    finally:
        publisher.stop()


def test_a_reading_taken_before_connecting_is_not_kept(queue, monkeypatch):
    # /health asked while the gateway was still connecting used to keep
    # "RabbitMQ not connected" for QUEUE_STATE_AGE after it had connected.
    monkeypatch.setattr(gateway_module, "QUEUE_STATE_AGE", 60)
    publisher = gateway_module.Publisher(helpers.rabbit_params(), queue)
    assert publisher.queue_state() == "RabbitMQ not connected"
    publisher.start()
    try:
        helpers.wait_for(publisher.ready.is_set, what="the publisher to connect")
        assert publisher.queue_state() == (0, 0)
    finally:
        publisher.stop()


def test_a_deleted_queue_does_not_stop_orders(procs, queue, inventory):
    port = helpers.free_port()
    gateway = procs("gateway", helpers.gateway_env(port, inventory.port, queue), port)
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "GET", "/health")[2].get("rabbitmq") == "ok",
        what="the gateway to connect",
    )
    helpers.delete_queues(queue)
    status, body = health_where(
        gateway, lambda b: "queue" not in b, "/health to miss the queue"
    )
    assert status == 200 and body["status"] == "degraded", body
    assert "no queue" in body["billing"], body
    assert helpers.call(gateway.url, "POST", "/api/billing", ORDER)[0] == 200
    status, body = health_where(
        gateway, lambda b: "queue" in b, "/health to see the queue again"
    )
    assert body["queue"] == {"name": queue, "consumers": 0, "ready": 1}, body


def test_inventory_health(inventory, procs):
    status, _, body = helpers.call(inventory.url, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "database": "ok"}
    port = helpers.free_port()
    down = procs(
        "inventory",
        {**helpers.inventory_env(port), "INVENTORY_DB_PORT": str(helpers.free_port())},
        port,
    )
    status, _, body = helpers.call(down.url, "GET", "/health")
    assert status == 503, body
    assert body == {"status": "down", "database": "database unavailable"}


def test_message_id_is_logged_with_its_request(gateway):
    status, headers, _ = helpers.call(
        gateway.url, "POST", "/api/billing", ORDER, {"X-Request-Id": "ord-77"}
    )
    assert status == 200
    message_id = headers["X-Message-Id"]
    helpers.wait_for(
        lambda: any(
            "ord-77" in x and message_id in x for x in gateway.tail(300).splitlines()
        ),
        what="the gateway's order line",
    )


def timed_health(gateway):
    """(status, body, seconds) of the gateway's /health."""
    start = time.monotonic()
    status, _, body = helpers.call(gateway.url, "GET", "/health")
    return status, body, time.monotonic() - start


def test_health_shows_a_hung_inventory_within_seconds(procs, inventory, queue):
    """inventory stopped (SIGSTOP: it accepts, never answers): /health says so
    within HEALTH_TIMEOUT, not after the 10 s a movie request may take."""
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    os.kill(inventory.proc.pid, signal.SIGSTOP)
    try:
        status, body, took = timed_health(gateway)
    finally:
        os.kill(inventory.proc.pid, signal.SIGCONT)
    assert status == 503 and "timed out" in body["inventory"], body
    assert took < gateway_module.HEALTH_TIMEOUT + 1, took
    helpers.wait_for(lambda: timed_health(gateway)[0] == 200, what="/health 200 again")


def test_health_shows_a_hung_rabbitmq(procs, inventory, queue):
    """RabbitMQ's Erlang VM stopped (SIGSTOP): its connection stays open, orders
    time out, and /health says RabbitMQ does not answer (503), not "ok"."""
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    beam = int(subprocess.check_output(["pgrep", "-o", "-x", "beam.smp"]))
    os.kill(beam, signal.SIGSTOP)
    try:
        time.sleep(gateway_module.QUEUE_STATE_AGE)  # the last reading is stale
        status, body, took = timed_health(gateway)
    finally:
        os.kill(beam, signal.SIGCONT)
    assert status == 503 and "did not answer" in body["rabbitmq"], body
    assert took < gateway_module.QUEUE_STATE_WAIT + 1, took
    helpers.wait_for(
        lambda: timed_health(gateway)[0] == 200, timeout=30, what="/health 200 again"
    )
