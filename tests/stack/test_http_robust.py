"""HTTP parsing of gateway and inventory: what a careless or hostile client sends.

Regression tests for what an outside review found: huge numbers in an order, Expect: 100-continue, absurd or ambiguous framing, HTTP/1.0
clients, header volume and requests in flight at SIGTERM. What both servers
must do alike is written once and run against each (the `server` fixture).
"""

import http.client
import json
import signal
import socket
import threading
import time
import uuid

import helpers
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from rawhttp import Client
from rawhttp import FakeUpstream
from rawhttp import exchange
from rawhttp import json_answer
from rawhttp import wait_closed

import gateway as gateway_module

MAX_HEAD = 64 * 1024  # the services' cap on a request's line and headers


def assert_json_error(response, status, what=""):
    """An error answer with status and a JSON {"error": ...} body."""
    assert response is not None, f"{what}: closed without an answer"
    assert response.status == status, (what, response)
    assert response.header("content-type") == "application/json", (what, response)
    assert json.loads(response.body)["error"], (what, response)


def log_size(service):
    return service.log_path.stat().st_size


def log_since(service, offset):
    with open(service.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


# --- 1. Numbers no Decimal can hold (gateway) ---

HUGE_NUMBERS = [
    "1e1000000000000000000",
    "-1e1000000000000000000",
    "1E+999999999999999999999",
    "1e-1000000000000000000",
    "0.5e99999999999999999999",
    "9" * 5000,
    "9" * 5000 + ".5",
    "NaN",
    "Infinity",
    "-Infinity",
]


@pytest.mark.parametrize("field", (*gateway_module.ORDER_FIELDS, "extra"))
@pytest.mark.parametrize("number", HUGE_NUMBERS)
def test_order_with_unholdable_number_is_400(gateway, queue_name, field, number):
    order = {"user_id": "1", "number_of_items": "1", "total_amount": "1"}
    order[field] = "@"
    body = json.dumps(order).replace('"@"', number).encode()
    before, depth = log_size(gateway), helpers.queue_depth(queue_name)
    response = exchange(
        gateway.port,
        b"POST /api/billing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert_json_error(response, 400, number[:30])
    assert "Traceback" not in log_since(gateway, before)
    assert helpers.queue_depth(queue_name) == depth


def number_texts():
    """JSON number texts, with exponents and lengths far beyond any column."""
    digits = st.text("0123456789", min_size=1, max_size=40)
    exponent = st.integers(-(10**30), 10**30).map(lambda e: f"e{e}")
    return st.builds(
        lambda sign, whole, frac, exp: f"{sign}{whole.lstrip('0') or '0'}{frac}{exp}",
        st.sampled_from(["", "-"]),
        digits,
        st.sampled_from(["", ".5", ".25", ".125", ".0"])
        | digits.map(lambda d: "." + d),
        st.sampled_from([""]) | exponent,
    )


def json_values():
    """Any JSON value, as Python data."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


def field_texts():
    """The JSON text of one order field: a number, a string or any value."""
    return (
        number_texts()
        | number_texts().map(json.dumps)
        | json_values().map(json.dumps)
        | st.sampled_from(HUGE_NUMBERS)
    )


def answer_order(body):
    """What the gateway's POST /api/billing decides about body, without I/O."""
    try:
        gateway_module.validate_order(
            gateway_module.decode_object(body, "request body")
        )
    except gateway_module.ApiError as exc:
        assert 400 <= exc.status < 500, exc.status
        return exc.status
    return 200


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    fields=st.dictionaries(
        st.sampled_from((*gateway_module.ORDER_FIELDS, "extra")),
        field_texts(),
        min_size=0,
        max_size=4,
    )
)
def test_order_validation_never_fails_on_any_order_text(fields):
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    assert answer_order(body.encode()) in (200, 400)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=json_values())
def test_order_validation_never_fails_on_any_json_value(value):
    assert answer_order(json.dumps(value).encode()) in (200, 400)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200))
def test_order_validation_never_fails_on_any_bytes(body):
    assert answer_order(body) in (200, 400)


# --- 4. Expect: 100-continue ---


def create_request(title, extra=b""):
    """A POST /api/movies head and body for a movie called title."""
    body = json.dumps({"title": title, "description": "d"}).encode()
    head = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (len(body), extra)
    )
    return head, body


def movies_titled(db, title):
    return helpers.rows(db, "SELECT count(*) FROM movies WHERE title = %s", (title,))[
        0
    ][0]


def test_expect_100_client_that_waits_for_it(server, clean_movies):
    title = f"expect-wait-{uuid.uuid4().hex[:8]}"
    head, body = create_request(title, b"Expect: 100-continue\r\n")
    client = Client(server.port)
    try:
        start = time.monotonic()
        client.send(head)
        interim = client.response(interim=True)
        assert interim is not None and interim.status == 100, interim
        client.send(body)
        response = client.response()
        assert response is not None and response.status == 201, response
        assert time.monotonic() - start < 3
    finally:
        client.close()
    assert movies_titled(clean_movies, title) == 1


def test_expect_100_client_that_sends_the_body_anyway(server, clean_movies):
    # curl waits up to a second for the 100, then sends the body regardless.
    title = f"expect-curl-{uuid.uuid4().hex[:8]}"
    head, body = create_request(title, b"Expect: 100-continue\r\n")
    client = Client(server.port)
    try:
        start = time.monotonic()
        client.send(head)
        time.sleep(1)
        client.send(body)
        response = client.response()
        assert response is not None and response.status == 201, response
        assert time.monotonic() - start < 4
        client.send(b"GET /api/movies?limit=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200  # the connection is still in step
    finally:
        client.close()
    assert movies_titled(clean_movies, title) == 1


def test_expect_100_refused_request_gets_no_100(server):
    # A request refused before its body is read gets its final status at once,
    # not a 100 that would make the client send a body nobody reads.
    head = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2000000\r\nExpect: 100-continue\r\n\r\n"
    )
    client = Client(server.port)
    try:
        client.send(head)
        response = client.response(interim=True)
        assert_json_error(response, 413)
        assert client.closed()
    finally:
        client.close()


@pytest.fixture
def fake_gateway(queue_name):
    """A gateway in front of a recording fake inventory: (gateway, upstream)."""
    made = []

    def make(answer):
        upstream = FakeUpstream(answer)
        port = helpers.free_port()
        env = helpers.gateway_env(port, upstream.port, queue_name)
        env["INVENTORY_TIMEOUT"] = "3"
        service = helpers.Service("gateway", env, port).start()
        made.append((service, upstream))
        return service, upstream

    yield make
    for service, upstream in made:
        service.stop()
        upstream.close()


def test_gateway_does_not_forward_expect(fake_gateway):
    gateway, upstream = fake_gateway(lambda request: json_answer(b'{"id": 1}'))
    head, body = create_request("x", b"Expect: 100-continue\r\n")
    client = Client(gateway.port)
    try:
        client.send(head + body)
        assert client.response().status == 200
    finally:
        client.close()
    assert not upstream.problems, upstream.problems
    [request] = upstream.requests
    assert request.values("expect") == [] and request.body == body


def test_gateway_skips_interim_answers_from_upstream(fake_gateway):
    def answer(request):
        return (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: 1\r\n\r\n"
            + json_answer(b'{"id": 7}', b"201 Created", b"Location: /api/movies/7\r\n")
        )

    gateway, _ = fake_gateway(answer)
    head, body = create_request("x")
    client = Client(gateway.port)
    try:
        start = time.monotonic()
        for _ in range(2):  # the upstream connection stays in step
            client.send(head + body)
            response = client.response(interim=True)
            assert response.status == 201 and response.body == b'{"id": 7}', response
            assert response.header("location") == "/api/movies/7"
        assert time.monotonic() - start < 2
    finally:
        client.close()


def test_gateway_reads_no_body_after_head_even_if_chunked(fake_gateway):
    # Found by the fuzzer: the gateway waited for chunks of a HEAD answer.
    def answer(request):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n"

    gateway, _ = fake_gateway(answer)
    client = Client(gateway.port)
    try:
        start = time.monotonic()
        for _ in range(2):  # the upstream connection stays in step
            client.send(b"HEAD /api/movies HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.response("HEAD").status == 200
        assert time.monotonic() - start < 1
    finally:
        client.close()


# --- 5. and 6. Content-Length and ambiguous framing ---

BAD_FRAMING = {
    "content-length of 5,000 digits": b"Content-Length: " + b"1" * 5000 + b"\r\n",
    "content-length of 30 digits": b"Content-Length: " + b"9" * 30 + b"\r\n",
    "two different lengths": b"Content-Length: 0\r\nContent-Length: 14\r\n",
    "a list of different lengths": b"Content-Length: 0, 14\r\n",
    "length with a plus": b"Content-Length: +0\r\n",
    "negative length": b"Content-Length: -1\r\n",
    "length with a space inside": b"Content-Length: 1 4\r\n",
    "empty length": b"Content-Length: \r\n",
    "hexadecimal length": b"Content-Length: 0x0\r\n",
    "non-ASCII digits": "Content-Length: \u0661\r\n".encode(),
    "length and chunked": b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
    "chunked and length": b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
    "bare CR inside a header": b"X-A: a\rContent-Length: 14\r\n",
    "bare CR ending a header": b"X-A: a\r\r\n",
    "line without a colon": b"X-Broken-Line\r\n",
    "line without a colon before a length": b"Oops\r\nContent-Length: 14\r\n",
    "space before the colon": b"Content-Length : 14\r\n",
    "tab before the colon": b"X-A\t: 1\r\n",
    "obs-fold continuation": b"X-A: a\r\n b\r\n",
    "tab continuation": b"X-A: a\r\n\tContent-Length: 14\r\n",
    "space in a header name": b"X A: 1\r\n",
    "empty header name": b": 1\r\n",
    "NUL in a value": b"X-A: a\x00b\r\n",
    "control character in a value": b"X-A: a\x01b\r\n",
    "DEL in a name": b"X-\x7f: 1\r\n",
}


@pytest.mark.parametrize("what", list(BAD_FRAMING))
def test_ambiguous_framing_is_400_and_never_run(server, clean_movies, what):
    # Each would let a body or a second request pass as something else: the
    # request is refused whole, the connection closed, nothing stored.
    before = log_size(server)
    body = b'{"title": "x"}'
    request = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + BAD_FRAMING[what]
        + b"\r\n"
        + body
    )
    client = Client(server.port)
    try:
        client.send(request)
        assert_json_error(client.response(), 400, what)
        assert client.closed(), what
    finally:
        client.close()
    assert helpers.rows(clean_movies, "SELECT count(*) FROM movies") == [(0,)]
    assert "Traceback" not in log_since(server, before)


@pytest.mark.parametrize("what", ["line without a colon", "obs-fold continuation"])
def test_malformed_header_on_a_get_is_400(server, what):
    request = b"GET /api/movies HTTP/1.1\r\nHost: x\r\n" + BAD_FRAMING[what] + b"\r\n"
    assert_json_error(exchange(server.port, request), 400, what)


def test_smuggled_request_behind_a_second_length_is_not_run(server, clean_movies):
    smuggled = b"DELETE /api/movies HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"{}" + smuggled
    request = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with helpers.admin_connect(clean_movies) as conn:
        conn.execute("INSERT INTO movies (title, description) VALUES ('keep', '')")
    client = Client(server.port)
    try:
        client.send(request)
        assert_json_error(client.response(), 400)
        assert client.closed()
    finally:
        client.close()
    assert helpers.rows(clean_movies, "SELECT title FROM movies") == [("keep",)]


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 14\r\nContent-Length: 14\r\n",
        b"Content-Length: 14, 14\r\n",
        b"Content-Length:14\r\n",
        b"Content-Length: \t14 \t\r\n",
    ],
)
def test_identical_lengths_and_whitespace_are_one_length(server, clean_movies, lengths):
    # RFC 9112 6.3: identical repeated values are that single value.
    request = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + lengths
        + b'\r\n{"title": "x"}'
    )
    response = exchange(server.port, request)
    assert response.status == 201, response


def test_headers_cut_off_by_the_client_are_not_run(server, clean_movies):
    # The head never ended (no blank line): the request was never complete.
    with helpers.admin_connect(clean_movies) as conn:
        conn.execute("INSERT INTO movies (title, description) VALUES ('keep', '')")
    client = Client(server.port)
    try:
        client.send(b"DELETE /api/movies HTTP/1.1\r\nHost: x\r\nX-Half: ab")
        client.sock.shutdown(socket.SHUT_WR)
        response = client.response()
        assert response is None or 400 <= response.status < 500, response
    finally:
        client.close()
    assert helpers.rows(clean_movies, "SELECT title FROM movies") == [("keep",)]


# --- 7. HTTP/1.0 clients and long lists ---


@pytest.fixture
def many_movies(clean_movies):
    """4,500 movies: more than one streamed page."""
    with helpers.admin_connect(clean_movies) as conn:
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT 'Bulk ' || i, 'd' FROM generate_series(1, 4500) AS i"
        )
    return 4500


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
def test_http10_client_gets_a_list_it_can_read(server, many_movies, connection):
    client = Client(server.port)
    try:
        client.send(b"GET /api/movies HTTP/1.0\r\nHost: x\r\n" + connection + b"\r\n")
        response = client.response()
        assert response.status == 200
        assert response.header("transfer-encoding") is None, response.headers
        assert len(json.loads(response.body)) == many_movies
        assert client.closed()
    finally:
        client.close()


def test_http11_client_still_gets_the_list_streamed(server, many_movies):
    client = Client(server.port)
    try:
        for _ in range(2):  # and the connection stays open
            client.send(b"GET /api/movies HTTP/1.1\r\nHost: x\r\n\r\n")
            response = client.response()
            assert response.header("transfer-encoding") == "chunked"
            assert len(json.loads(response.body)) == many_movies
    finally:
        client.close()


# --- 13. Header volume ---


def request_with_headers(total):
    """A GET whose head (request line included) is about total bytes."""
    line = b"GET /api/movies?limit=1 HTTP/1.1\r\nHost: x\r\n"
    value = b"v" * 1000
    size = len(b"X-Pad-000: \r\n") + len(value)
    count = -(-(total - len(line) - 2) // size)  # rounded up
    headers = b"".join(b"X-Pad-%03d: %s\r\n" % (i, value) for i in range(count))
    return line + headers + b"\r\n"


def test_header_volume_over_64kib_is_431(server):
    for total in (MAX_HEAD + 100, 5 * MAX_HEAD):
        request = request_with_headers(total)
        assert len(request) > MAX_HEAD
        assert_json_error(exchange(server.port, request), 431, total)


def test_header_volume_under_the_cap_is_served(server):
    request = request_with_headers(MAX_HEAD // 2)
    assert exchange(server.port, request).status == 200


def test_one_huge_header_is_431(server):
    request = (
        b"GET /api/movies HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
    )
    assert_json_error(exchange(server.port, request), 431)


# --- 12. SIGTERM and SIGINT finish the requests in flight ---


def test_gateway_finishes_requests_in_flight_on_sigterm(fake_gateway):
    big = json.dumps([{"id": i, "title": "t" * 50} for i in range(3000)]).encode()

    def slow_answer(request):
        time.sleep(2)
        return json_answer(big)

    gateway, _ = fake_gateway(slow_answer)
    idle = Client(gateway.port)  # a kept-alive connection, idle: must not delay exit
    idle.send(b"GET /health/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.response().status == 404
    result = {}
    client = Client(gateway.port)
    client.send(b"GET /api/movies HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = threading.Thread(target=lambda: result.update(r=client.response()))
    reader.start()
    time.sleep(0.5)
    start = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    refused_after = wait_closed(gateway.port, 1.5)
    reader.join(10)
    code = gateway.proc.wait(10)
    took = time.monotonic() - start
    client.close()
    idle.close()
    response = result["r"]
    assert response is not None and response.status == 200, response
    assert response.body == big
    assert response.header("connection") == "close"
    assert code == 0 and took < 4.5, (code, took, gateway.tail())
    assert refused_after < 1


def test_inventory_finishes_requests_in_flight_on_sigint(movies_db, clean_movies):
    port = helpers.free_port()
    inventory = helpers.Service("inventory", helpers.inventory_env(port), port).start()
    lock = helpers.admin_connect(movies_db)
    try:
        movie_id = helpers.rows(
            movies_db,
            "INSERT INTO movies (title, description) VALUES ('slow', 'd') RETURNING id",
        )[0][0]
        lock.autocommit = False
        lock.execute("LOCK TABLE movies IN ACCESS EXCLUSIVE MODE")
        client = Client(port)
        client.send(b"GET /api/movies/%d HTTP/1.1\r\nHost: x\r\n\r\n" % movie_id)
        time.sleep(0.5)  # the request now waits on the lock
        start = time.monotonic()
        inventory.proc.send_signal(signal.SIGINT)  # what PM2 sends first
        refused_after = wait_closed(port, 1.5)
        time.sleep(1)
        lock.rollback()  # the database answers: the request completes
        response = client.response()
        client.close()
        code = inventory.proc.wait(10)
        took = time.monotonic() - start
        assert response is not None and response.status == 200, response
        assert json.loads(response.body)["title"] == "slow"
        assert code == 0 and took < 4.5, (code, took, inventory.tail())
        assert refused_after < 1
    finally:
        lock.close()
        inventory.stop()


def test_shutdown_waits_no_longer_than_the_grace(fake_gateway):
    def stuck(request):
        time.sleep(30)
        return json_answer()

    gateway, _ = fake_gateway(stuck)
    client = Client(gateway.port)
    client.send(b"GET /api/movies HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)
    start = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    code = gateway.proc.wait(10)
    client.close()
    assert code == 0 and time.monotonic() - start < 4.5  # PM2 kills at 5 s


# --- Both servers: URLs, framing, versions, keep-alive and idle clients ---


def recv_until_closed(sock):
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def raw_exchange(port, request):
    """Send raw bytes; return everything answered until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_closed(sock)


def test_raw_utf8_in_url_is_understood(server, clean_movies):
    movie = helpers.call(server.url, "POST", "/api/movies", {"title": "Amélie"})[2]
    answer = raw_exchange(
        server.port,
        "GET /api/movies?title=Amélie HTTP/1.1\r\nHost: x\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == [movie]
    answer = raw_exchange(
        server.port, "GET /api/movies/é HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /api/movies HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/movies HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /api/movies HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET /api/movies HTTP/1.0\r\n\r\n", 200),  # Host came with 1.1
        (b"GET /api/movies HTTP/1.1\r\nhost: a\r\nConnection: close\r\n\r\n", 200),
    ],
)
def test_an_http11_request_names_one_host(server, clean_movies, head, status):
    # RFC 9112 3.2: no Host, or two, is a 400, and the connection closes.
    answer = raw_exchange(server.port, head + b"GET /api/movies HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 1
    if status == 400:
        assert b"send one Host header" in answer


@pytest.mark.parametrize(
    "target",
    ["http://[::1/api/movies", "http://]/api/movies", "http://a[b]/api/movies/1"],
)
def test_an_absolute_url_with_a_broken_host_is_400(server, target):
    # urlsplit() raised ValueError: the connection closed without an answer.
    answer = raw_exchange(server.port, f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"error"' in answer, answer


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from("é€"),
        max_size=40,
    ).map(lambda rest: "http://" + rest)
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
)
def test_any_request_target_gets_an_answer_under_500(server, target):
    answer = raw_exchange(
        server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    assert 200 <= int(answer[9:12]) < 500, answer[:200]


@pytest.mark.parametrize("char", [b"\x01", b"\x7f"])
def test_control_characters_in_url_are_400(server, char):
    answer = raw_exchange(
        server.port, b"GET /api/movies" + char + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"error"' in answer


def test_transfer_encoding_is_411_and_closes(server):
    request = (
        b"DELETE /api/movies/999 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n2a\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n"
    )
    answer = raw_exchange(server.port, request)
    assert answer.startswith(b"HTTP/1.1 411 ")
    assert answer.count(b"HTTP/1.1") == 1  # the body was not run as a request


def test_unsupported_http_version_has_a_status_line(server):
    answer = raw_exchange(server.port, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 505 ") and b'"error"' in answer


def test_oversized_body_is_413_without_reading_it(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 2000000\r\n\r\n{"
        )
        answer = recv_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"error"' in answer


def test_keep_alive_serves_many_requests_on_one_connection(server, clean_movies):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(20):
        conn.request("GET", "/api/movies")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"[]"
    conn.close()


def test_idle_client_is_timed_out(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"GET /api/mov")  # and then nothing
        start = time.monotonic()
        answer = recv_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"error"' in answer
        assert time.monotonic() - start < 15
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"GET /api/movies HTTP/1.1\r\nHost: x\r\n")  # headers unfinished
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        start = time.monotonic()
        assert sock.recv(4096) == b""  # idle: closed without a word
        assert 5 < time.monotonic() - start < 15


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc&limit=1",
        "limit=99999999999&limit=1",
        "offset=-5&offset=0&limit=1",
        "title=%00&title=x",
        "title=a&title=b",
    ],
)
def test_a_query_parameter_sent_twice_with_two_values_is_400(server, query):
    # The last value won: an earlier malformed one was never checked.
    status, _, body = helpers.call(server.url, "GET", f"/api/movies?{query}")
    assert status == 400 and "once" in body["error"], (status, body)
    status, _, _ = helpers.call(server.url, "GET", "/api/movies?limit=1&limit=1")
    assert status == 200


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/" + "a" * 60000, None),
        ("X" * 60000, "/health", None),
        ("POST", "/api/movies", {"k" * 500000: 1}),
    ],
)
def test_an_error_quotes_at_most_80_characters_of_what_was_sent(
    server, method, path, body
):
    status, _, answer = helpers.call(server.url, method, path, body)
    assert 400 <= status < 500 and len(answer["error"]) < 200, (status, answer)


def test_an_order_error_quotes_at_most_80_characters_of_a_field_name(gateway):
    body = {"k" * 60000: 1}
    status, _, answer = helpers.call(gateway.url, "POST", "/api/billing", body)
    assert status == 400 and len(answer["error"]) < 200, (status, answer)


@pytest.mark.parametrize("size", [4 * 1024 * 1024, 12 * 1024 * 1024])
def test_a_refused_body_still_sent_in_full_gets_its_answer(server, size):
    # 413 at once, then the server closed with the body unread: the kernel
    # sent a reset, and a client still sending lost the answer (BrokenPipe).
    head = (
        b"POST /api/movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(head)
        time.sleep(0.2)  # the answer is on its way before the body
        sock.sendall(b"x" * size)
        answer = recv_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"error"' in answer, answer[:80]
