"""Gateway against the real inventory and the real RabbitMQ."""

import concurrent.futures
import http.client
import json
import socket
import subprocess
import threading
import time
from decimal import Decimal

import helpers
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gateway as gateway_module

ORDER = {"user_id": "20", "number_of_items": "99", "total_amount": "250"}


@pytest.fixture
def empty_queue(gateway, queue_name):
    helpers.drain_queue(queue_name)
    return queue_name


# --- Movies: a faithful proxy ---


JSON = "application/json"


def both(gateway, inventory, method, path, body=None, raw=None, headers=None):
    """The same request to inventory and through the gateway."""
    direct = helpers.call(inventory.url, method, path, body, headers, raw)
    proxied = helpers.call(gateway.url, method, path, body, headers, raw)
    return direct, proxied


def test_proxy_create_list_get(gateway, inventory, clean_movies):
    status, headers, movie = helpers.call(
        gateway.url,
        "POST",
        "/api/movies/",
        {"title": "A new movie", "description": "Very short description"},
    )
    assert status == 201
    assert headers["Location"] == f"/api/movies/{movie['id']}"
    assert headers["Content-Type"] == "application/json"
    direct, proxied = both(gateway, inventory, "GET", "/api/movies/")
    assert proxied[0] == 200 and proxied[2] == direct[2] == [movie]
    direct, proxied = both(gateway, inventory, "GET", f"/api/movies/{movie['id']}")
    assert proxied[::2] == direct[::2] == (200, movie)


@pytest.mark.parametrize(
    "method, path, body, raw, ctype",
    [
        ("GET", "/api/movies/424242", None, None, None),
        ("GET", "/api/movies/abc", None, None, None),
        ("GET", "/api/movies?title=%25&limit=5", None, None, None),
        ("GET", "/api/movies?limit=0", None, None, None),
        ("POST", "/api/movies", {"title": ""}, None, None),
        ("POST", "/api/movies", None, b"{broken", "application/json"),
        ("POST", "/api/movies", None, b'{"title": "x"}', "text/plain"),
        ("PUT", "/api/movies/424242", {"title": "x"}, None, None),
        ("DELETE", "/api/movies/424242/", None, None, None),
        ("PATCH", "/api/movies/1", None, None, None),
        ("PUT", "/api/movies", {"title": "x"}, None, None),
        ("GET", "/api/movies/1/2", None, None, None),
        ("OPTIONS", "/api/movies", None, None, None),
    ],
)
def test_proxy_passes_statuses_and_bodies_through(
    gateway, inventory, clean_movies, method, path, body, raw, ctype
):
    headers = {"Content-Type": ctype} if ctype else None
    direct, proxied = both(gateway, inventory, method, path, body, raw, headers)
    assert proxied[0] == direct[0]
    assert proxied[2] == direct[2]
    for name in ("Content-Type", "Location", "Allow"):
        assert proxied[1].get(name) == direct[1].get(name), name


def test_proxy_does_not_forward_hop_by_hop_headers(gateway, clean_movies):
    status, headers, _ = helpers.call(
        gateway.url,
        "GET",
        "/api/movies",
        headers={"Connection": "keep-alive, X-Secret", "Keep-Alive": "timeout=5"},
    )
    assert status == 200
    assert "Keep-Alive" not in headers


def test_proxy_oversized_body_is_413(gateway):
    raw = json.dumps({"title": "t", "description": "d" * (1024 * 1024)}).encode()
    status, _, body = helpers.call(
        gateway.url,
        "POST",
        "/api/movies",
        raw=raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and body["error"]


def test_proxy_reuses_upstream_connections(gateway, inventory, clean_movies):
    def inventory_connections():
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"dport = :{inventory.port}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return len(out.splitlines())

    for _ in range(50):
        assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
    assert inventory_connections() <= 2


def test_inventory_down_is_502_then_recovers(queue_name, movies_db):
    inventory_port, port = helpers.free_port(), helpers.free_port()
    gateway = helpers.Service(
        "gateway", helpers.gateway_env(port, inventory_port, queue_name), port
    )
    gateway.start()
    inventory = helpers.Service(
        "inventory", helpers.inventory_env(inventory_port), inventory_port
    )
    try:
        start = time.monotonic()
        status, _, body = helpers.call(gateway.url, "GET", "/api/movies")
        assert status == 502 and body["error"] == "inventory unreachable"
        assert time.monotonic() - start < 1
        status, _, body = helpers.call(gateway.url, "GET", "/health")
        assert status == 503 and body["status"] == "degraded"
        assert body["inventory"] != "ok"
        inventory.start()
        assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
        helpers.wait_for(
            lambda: helpers.call(gateway.url, "GET", "/health")[0] == 200, what="health"
        )
        inventory.stop()
        assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 502
    finally:
        inventory.stop()
        gateway.stop()


def test_slow_inventory_is_504(queue_name):
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(
        target=lambda: held.append(listener.accept()), daemon=True
    ).start()  # accepts, then never answers
    port = helpers.free_port()
    env = {**helpers.gateway_env(port, listener.getsockname()[1], queue_name)}
    env["INVENTORY_TIMEOUT"] = "1"
    gateway = helpers.Service("gateway", env, port).start()
    try:
        start = time.monotonic()
        status, _, body = helpers.call(gateway.url, "GET", "/api/movies")
        assert status == 504 and body["error"] == "inventory timed out"
        assert time.monotonic() - start < 3
    finally:
        gateway.stop()
        listener.close()


# --- Billing ---


def test_billing_publishes_confirmed_persistent_message(gateway, empty_queue):
    for path in ("/api/billing", "/api/billing/"):
        status, _, body = helpers.call(gateway.url, "POST", path, ORDER)
        assert status == 200 and body == {"message": "Message posted"}
    messages = helpers.drain_queue(empty_queue)
    assert len(messages) == 2
    for properties, body in messages:
        assert json.loads(body) == ORDER
        assert properties.delivery_mode == 2
        assert properties.content_type == "application/json"
        assert properties.timestamp and abs(properties.timestamp - time.time()) < 60
    assert len({p.message_id for p, _ in messages}) == 2


def test_billing_idempotency_key_becomes_the_message_id(gateway, empty_queue):
    key = "3f0c2a9e-6d7b-4c1e-9a55-0b8e1d2f4a61"
    for order in (ORDER, ORDER, {**ORDER, "user_id": 77}):
        status, _, body = helpers.call(
            gateway.url, "POST", "/api/billing", order, {"Idempotency-Key": key}
        )
        assert status == 200, body
    ids = [p.message_id for p, _ in helpers.drain_queue(empty_queue)]
    same = gateway_module.keyed_message_id((20, 99, Decimal("250.00")), key)
    other = gateway_module.keyed_message_id((77, 99, Decimal("250.00")), key)
    assert ids == [same, same, other]
    assert same.startswith("key:20:") and same.endswith(f":{key}")


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "caf\xe9", "tab\tkey"])
def test_billing_malformed_idempotency_key_is_400(gateway, empty_queue, key):
    status, _, body = helpers.call(
        gateway.url, "POST", "/api/billing", ORDER, {"Idempotency-Key": key}
    )
    assert status == 400 and "Idempotency-Key" in body["error"]
    assert helpers.queue_depth(empty_queue) == 0


def test_billing_two_idempotency_keys_are_400(gateway, empty_queue):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=15)
    raw = json.dumps(ORDER).encode()
    conn.putrequest("POST", "/api/billing")
    for name, value in (
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(raw))),
        ("Idempotency-Key", "a"),
        ("Idempotency-Key", "b"),
    ):
        conn.putheader(name, value)
    conn.endheaders(raw)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and "one Idempotency-Key" in body["error"]
    assert helpers.queue_depth(empty_queue) == 0


def test_billing_body_is_forwarded_verbatim(gateway, empty_queue):
    raw = b'{"user_id": 3, "number_of_items": 5,\n "total_amount": 19.99}'
    status, _, _ = helpers.call(
        gateway.url,
        "POST",
        "/api/billing",
        raw=raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 200
    assert [body for _, body in helpers.drain_queue(empty_queue)] == [raw]


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"number_of_items": 1, "total_amount": 1}', "user_id"),
        (b'{"user_id": "abc", "number_of_items": 1, "total_amount": 1}', "user_id"),
        (b'{"user_id": 0, "number_of_items": 1, "total_amount": 1}', "user_id"),
        (
            b'{"user_id": 1, "number_of_items": -2, "total_amount": 1}',
            "number_of_items",
        ),
        (
            b'{"user_id": 1, "number_of_items": 1.5, "total_amount": 1}',
            "number_of_items",
        ),
        (
            b'{"user_id": 1, "number_of_items": 1, "total_amount": "1.999"}',
            "total_amount",
        ),
        (b'{"user_id": 1, "number_of_items": 1, "total_amount": -5}', "total_amount"),
        (b'{"user_id": 1, "number_of_items": 1}', "total_amount"),
        (b'{"user_id": 1, "number_of_items": 1, "total_amount": 1, "x": 1}', "'x'"),
        (b"[]", "JSON object"),
        (b"{oops", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_billing_rejects_bad_orders(gateway, empty_queue, raw, field):
    status, _, body = helpers.call(
        gateway.url,
        "POST",
        "/api/billing",
        raw=raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and field in body["error"]
    assert helpers.queue_depth(empty_queue) == 0


def test_billing_wrong_content_type_and_size(gateway, empty_queue):
    status, _, body = helpers.call(
        gateway.url,
        "POST",
        "/api/billing",
        raw=json.dumps(ORDER).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415 and body["error"]
    big = json.dumps({**ORDER, "pad": "x" * 70_000}).encode()
    status, _, body = helpers.call(
        gateway.url,
        "POST",
        "/api/billing",
        raw=big,
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and body["error"]
    status, headers, body = helpers.call(gateway.url, "GET", "/api/billing")
    assert status == 405 and headers["Allow"] == "POST" and body["error"]
    assert helpers.queue_depth(empty_queue) == 0


@pytest.fixture
def fresh_gateway(inventory, queue):
    """A gateway on a queue nobody has declared yet: (service, queue name)."""
    port = helpers.free_port()
    service = helpers.Service(
        "gateway", helpers.gateway_env(port, inventory.port, queue), port
    )
    service.start()
    helpers.wait_for(
        lambda: helpers.call(service.url, "GET", "/health")[0] == 200, what="health"
    )
    yield service, queue
    service.stop()


def test_order_kept_when_queue_never_declared(fresh_gateway):
    gateway, queue = fresh_gateway
    assert helpers.call(gateway.url, "POST", "/api/billing", ORDER)[0] == 200
    assert helpers.queue_depth(queue) == 1


def test_unroutable_orders_are_503_even_with_one_key(fresh_gateway):
    # The queue vanishes under a running gateway and cannot be declared again
    # (its dead-letter queue now has other arguments): RabbitMQ returns each
    # publish, and attempts sharing a message id must all be refused.
    gateway, queue = fresh_gateway
    helpers.delete_queues(queue)
    conn, channel = helpers.rabbit_channel()
    channel.queue_declare(f"{queue}.dead", durable=True, arguments={"x-max-length": 5})
    conn.close()

    def post(_):
        headers = {"Idempotency-Key": "same"}
        return helpers.call(gateway.url, "POST", "/api/billing", ORDER, headers)[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(post, range(4))) == [503] * 4


def test_concurrent_orders_each_confirmed_once(gateway, empty_queue):
    def post(i):
        order = {"user_id": i + 1, "number_of_items": 1, "total_amount": "1.50"}
        return helpers.call(gateway.url, "POST", "/api/billing", order)[0]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(post, range(500)))
    assert statuses == [200] * 500
    messages = helpers.drain_queue(empty_queue)
    assert len(messages) == 500
    assert sorted(json.loads(b)["user_id"] for _, b in messages) == list(range(1, 501))
    assert len({p.message_id for p, _ in messages}) == 500


def test_rabbitmq_down_is_503_then_recovers(gateway, empty_queue):
    try:
        helpers.rabbit("stop_app")
        helpers.wait_for(
            lambda: helpers.call(gateway.url, "GET", "/health")[2]["rabbitmq"] != "ok",
            what="gateway to notice RabbitMQ is down",
        )
        start = time.monotonic()
        status, _, body = helpers.call(gateway.url, "POST", "/api/billing", ORDER)
        assert status == 503 and body["error"]
        assert time.monotonic() - start < 5
    finally:
        helpers.rabbit("start_app")
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "POST", "/api/billing", ORDER)[0] == 200,
        timeout=30,
        what="billing posts to succeed again",
    )
    assert helpers.queue_depth(empty_queue) >= 1


# --- The rest ---


def test_health_ok(gateway):
    status, _, body = helpers.call(gateway.url, "GET", "/health")
    assert status == 200  # "degraded" while no billing consumes: see test_observability
    assert (body["inventory"], body["rabbitmq"]) == ("ok", "ok")


def test_unknown_paths_and_methods(gateway):
    for path in ("/", "/api", "/api/movie", "/api/billingx", "/nope"):
        status, _, body = helpers.call(gateway.url, "GET", path)
        assert status == 404 and body["error"], path
    status, headers, body = helpers.call(gateway.url, "DELETE", "/health")
    assert status == 405 and headers["Allow"] == "GET" and body["error"]


def test_serves_openapi_and_docs(gateway):
    status, headers, body = helpers.call(gateway.url, "GET", "/openapi.yaml")
    assert status == 200 and headers["Content-Type"] == "application/yaml"
    assert b"openapi:" in body
    status, headers, body = helpers.call(gateway.url, "GET", "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/openapi.yaml" in body
    status, _, body = helpers.call(gateway.url, "GET", "/docs/..%2F.env")
    assert status == 404


def test_proxy_relays_streamed_lists(gateway, inventory, clean_movies):
    with helpers.admin_connect(clean_movies) as conn:
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT 'Bulk ' || i, repeat('x', 100) FROM generate_series(1, 5000) AS i"
        )
    direct, proxied = both(gateway, inventory, "GET", "/api/movies")
    assert proxied[1]["Transfer-Encoding"] == "chunked"
    assert proxied[0] == 200 and proxied[2] == direct[2]
    assert len(proxied[2]) == 5000
    assert helpers.call(gateway.url, "GET", "/api/movies?limit=1")[2] == direct[2][:1]


@pytest.mark.parametrize("amount", ["1e30", "1e400", "9" * 32, "-0.001"])
def test_billing_huge_amounts_are_400(gateway, empty_queue, amount):
    raw = f'{{"user_id": 1, "number_of_items": 1, "total_amount": {amount}}}'
    status, _, body = helpers.call(
        gateway.url,
        "POST",
        "/api/billing",
        raw=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "total_amount" in body["error"]


def test_docs_assets_come_from_node_modules(gateway):
    for name, ctype in (
        ("swagger-ui.css", "text/css"),
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui-standalone-preset.js", "text/javascript"),
        ("favicon-32x32.png", "image/png"),
    ):
        status, headers, body = helpers.call(gateway.url, "GET", f"/docs/{name}")
        assert status == 200 and headers["Content-Type"] == ctype, name
        assert len(body) > 100
    status, _, body = helpers.call(gateway.url, "GET", "/docs")
    assert b"http" not in body.replace(b"http-equiv", b"")  # nothing from a CDN


def test_docs_serves_only_the_files_its_page_loads(gateway):
    assert {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-16x16.png",
        "favicon-32x32.png",
    } == gateway_module.DOCS_FILES
    for name in (
        "package.json",
        "README.md",
        "index.html",
        "swagger-initializer.js",
        "swagger-ui-bundle.js.map",
        "oauth2-redirect.html",
    ):
        assert (gateway_module.DOCS_ASSETS / name).is_file(), name  # it is there
        status = helpers.call(gateway.url, "GET", f"/docs/{name}")[0]
        assert status == 404, (name, status)


@settings(max_examples=60, deadline=None)
@given(
    st.text("abcXYZ019._-~%", min_size=1, max_size=20).map(lambda s: s * 30)
    | st.sampled_from(["a" * 256, "a" * 5000, "swagger-ui.css" + "x" * 300])
)
def test_docs_names_longer_than_a_file_name_are_404(gateway, name):
    # A name over 255 bytes made the file system refuse the lookup: a 500.
    status, _, body = helpers.call(gateway.url, "GET", f"/docs/{name}")
    assert status == 404 and len(body["error"]) < 200, (status, body)


def raw_answer(port, request):
    """Send raw bytes with Connection: close; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


@pytest.mark.parametrize(
    "first, second", [("text/plain", "application/json"), ("application/json", "x/y")]
)
def test_a_repeated_header_reaches_inventory_whole(gateway, inventory, first, second):
    # The gateway kept only the last of two Content-Type lines: 201 for what
    # inventory itself refuses with 415.
    body = b'{"title": "Twice"}'
    request = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Content-Type: {first}\r\nContent-Type: {second}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    direct = raw_answer(inventory.port, request)
    proxied = raw_answer(gateway.port, request)
    assert direct[:12] == proxied[:12], (direct[:12], proxied[:12])
    assert direct[:12] == (b"HTTP/1.1 415" if first != JSON else b"HTTP/1.1 201")
