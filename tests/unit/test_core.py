"""The HTTP core shared by gateway and inventory, tested from bytes without a server.

The core is one block, identical in both files (test_shared_blocks checks it);
each test runs against both copies all the same, as each file is run on its own.
"""

import contextlib
import json
import os
import re
import socket
import threading
import time
import types

import helpers
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway
import inventory


@pytest.fixture(params=[gateway, inventory], ids=["gateway", "inventory"])
def core(request):
    """The module whose copy of the core is under test."""
    return request.param


@pytest.fixture
def pair(core):
    """(a Connection on the server's end, the client's socket)."""
    server, client = socket.socketpair()
    yield core.Connection(server), client
    server.close()
    client.close()


def status_of(core, call, *args):
    """The status of the ApiError call(*args) raises (None if it returns)."""
    try:
        call(*args)
    except core.ApiError as exc:
        return exc.status
    return None


# --- the head reader ---


def test_a_head_is_split_into_its_parts(core):
    head = (
        b"POST /api/movies?x=1 HTTP/1.1\r\nHost: h\r\nX-Text: caf\xe9 \t\r\n"
        b"x-two: a\r\nX-Two: b\r\n\r\n"
    )
    method, target, version, headers = core.parse_head(head)
    assert (method, target, version) == ("POST", "/api/movies?x=1", "HTTP/1.1")
    assert headers.get("x-text") == "caf\xe9"  # latin-1, outer whitespace dropped
    assert headers.get_all("X-TWO") == ["a", "b"] and "host" in headers
    assert headers.items()[0] == ("Host", "h")


def test_bare_lf_line_ends_are_read(core):
    _, target, _, headers = core.parse_head(b"GET /a HTTP/1.0\nHost: h\n\n")
    assert target == "/a" and headers.get("Host") == "h"


def test_a_target_is_percent_encoded_and_slashes_collapsed(core):
    assert core.parse_request_line("GET /caf\xe9 HTTP/1.1")[1] == "/caf%E9"
    assert core.parse_request_line("GET //evil/x HTTP/1.1")[1] == "/evil/x"


@pytest.mark.parametrize(
    "line, status",
    [
        ("GARBAGE", 400),
        ("GET / HTTP/1.1 extra", 400),
        ("GET  / HTTP/1.1", 400),
        ("GET /", 400),
        ("GET / FOO/1.1", 400),
        ("GET / HTTP/1.1x", 400),
        ("GET / HTTP/1", 400),
        ("GET / HTTP/2.0", 505),
        ("G\x00T / HTTP/1.1", 400),
        ("G\xc9T / HTTP/1.1", 400),
        ("GET /a\x7f HTTP/1.1", 400),
        ("GET /a\rb HTTP/1.1", 400),
    ],
)
def test_bad_request_lines_are_refused(core, line, status):
    assert status_of(core, core.parse_request_line, line) == status


@pytest.mark.parametrize(
    "line",
    [
        b"X-Broken-Line",
        b"Content-Length : 14",
        b"X-A\t: 1",
        b" X-Leading: 1",
        b"\tX-Fold: 1",
        b": 1",
        b"X A: 1",
        b"X-A: a\rb",
        b"X-A: a\r",
        b"X-A: a\x00b",
        b"X-A: a\x01b",
        b"X-\x7f: 1",
    ],
)
def test_malformed_header_lines_are_400(core, line):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n"
    assert status_of(core, core.parse_head, head) == 400


def test_more_than_100_header_lines_are_431(core):
    lines = [b"X-%d: 1\r\n" % i for i in range(101)]
    head = b"GET / HTTP/1.1\r\n%s\r\n"
    assert status_of(core, core.parse_head, head % b"".join(lines)) == 431
    assert len(core.parse_head(head % b"".join(lines[1:]))[3].items()) == 100


@given(st.binary(max_size=300))
def test_any_head_parses_or_is_a_4xx_or_505(data):
    for core in (gateway, inventory):
        status = status_of(core, core.parse_head, data + b"\r\n\r\n")
        assert status is None or 400 <= status < 500 or status == 505


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", fullmatch=True),
            st.from_regex(
                r"[\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff\t]*[\x21-\x7e])?",
                fullmatch=True,
            )
            | st.just(""),
        ),
        max_size=20,
    )
)
def test_valid_header_fields_come_back_as_sent(fields):
    head = "GET / HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    headers = inventory.parse_head(head.encode("latin-1"))[3]
    assert headers.items() == fields


def head_of(core, headers, version="HTTP/1.1"):
    """Headers of a request as the core reads them."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return core.parse_head(f"POST / {version}\r\n{lines}\r\n".encode())[3]


@pytest.mark.parametrize(
    "headers, version, expected",
    [
        ([], "HTTP/1.1", (0, True, False)),
        ([], "HTTP/1.0", (0, False, False)),
        ([("Connection", "keep-alive")], "HTTP/1.0", (0, True, False)),
        ([("Connection", "Keep-Alive, x")], "HTTP/1.1", (0, True, False)),
        ([("Connection", "x, close")], "HTTP/1.1", (0, False, False)),
        ([("Content-Length", "14")], "HTTP/1.1", (14, True, False)),
        ([("Content-Length", "14, 14"), ("Content-Length", "14")], "HTTP/1.1", None),
        ([("Expect", "100-Continue")], "HTTP/1.1", (0, True, True)),
        ([("Expect", "100-continue")], "HTTP/1.0", (0, False, False)),
    ],
)
def test_framing_of_good_requests(core, headers, version, expected):
    framing = core.read_framing(head_of(core, headers, version), version)
    assert framing == (expected or (14, True, False))


@pytest.mark.parametrize(
    "headers, status",
    [
        ([("Transfer-Encoding", "chunked")], 411),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "0")], 400),
        ([("Content-Length", "0"), ("Content-Length", "14")], 400),
        ([("Content-Length", "0, 14")], 400),
        ([("Content-Length", "+0")], 400),
        ([("Content-Length", "-1")], 400),
        ([("Content-Length", "1 4")], 400),
        ([("Content-Length", "")], 400),
        ([("Content-Length", "0x0")], 400),
        ([("Content-Length", "9" * 30)], 400),
    ],
)
def test_ambiguous_framing_is_refused(core, headers, status):
    headers = head_of(core, headers)
    assert status_of(core, core.read_framing, headers, "HTTP/1.1") == status


def test_non_ascii_digits_are_no_length(core):
    headers = core.Headers([("Content-Length", "\u0661")])
    assert status_of(core, core.read_framing, headers, "HTTP/1.1") == 400


# --- reading from a connection, and the deadline ---


def test_heads_are_read_one_by_one_and_blank_lines_skipped(pair, core):
    conn, client = pair
    client.sendall(b"\r\nGET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\nX: 1\n\nbody")
    assert core.read_request_head(conn) == b"GET /a HTTP/1.1\r\n\r\n"
    assert core.read_request_head(conn) == b"GET /b HTTP/1.1\nX: 1\n\n"
    assert conn.read_exact(4) == b"body"


def test_a_head_over_max_head_is_431_and_a_long_line_414(pair, core):
    conn, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * core.MAX_HEAD + b"\r\n\r\n")
    assert status_of(core, core.read_request_head, conn) == 431
    conn.buffer[:] = b"GET /" + b"a" * (core.MAX_HEAD + 10) + b" HTTP/1.1\r\n\r\n"
    assert status_of(core, core.read_request_head, conn) == 414


def test_a_head_the_client_ends_early_is_400_and_none_is_none(pair, core):
    conn, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nX-Half: ab")
    client.shutdown(socket.SHUT_WR)
    assert status_of(core, core.read_request_head, conn) == 400
    conn.buffer.clear()
    assert core.read_request_head(conn) is None


def test_the_deadline_counts_down_and_then_raises(core):
    deadline = core.Deadline(0.2)
    assert 0 < deadline.left() <= 0.2
    time.sleep(0.25)
    with pytest.raises(TimeoutError):
        deadline.left()


def test_a_slow_head_is_408_at_the_deadline_even_if_bytes_trickle(pair, core):
    conn, client = pair
    conn.deadline = core.Deadline(0.5)
    stop = threading.Event()

    def trickle():
        """One byte every 0.1 s: each read may wait only what is left."""
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                client.send(b"a")

    client.sendall(b"GET /")
    thread = threading.Thread(target=trickle)
    thread.start()
    start = time.monotonic()
    try:
        assert status_of(core, core.read_request_head, conn) == 408
    finally:
        stop.set()
        thread.join()
    assert time.monotonic() - start < 0.8


def test_an_idle_connection_ends_silently_at_the_deadline(pair, core):
    conn, _ = pair
    conn.deadline = core.Deadline(0.2)
    start = time.monotonic()
    assert core.read_request_head(conn) is None
    assert 0.15 < time.monotonic() - start < 1


def test_a_body_cut_short_is_408_and_ends_keep_alive(pair, core):
    conn, client = pair
    conn.deadline = core.Deadline(0.2)
    client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    req = core.Request(core.parse_head(core.read_request_head(conn)), ("1", 2), conn)
    assert status_of(core, req.read_body, 100) == 408
    assert not req.keep_alive and req.body_read


def test_expect_100_is_sent_only_when_the_body_is_read(pair, core):
    conn, client = pair
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
    )
    client.sendall(head + b"Content-Type: text/plain\r\n\r\n")
    req = core.Request(core.parse_head(core.read_request_head(conn)), ("1", 2), conn)
    assert status_of(core, req.read_body, 100, True) == 415
    assert status_of(core, req.read_body, 1) == 413
    client.settimeout(0.1)
    with pytest.raises(TimeoutError):
        client.recv(100)  # no 100 Continue for a refused body
    client.sendall(b"{}")
    assert req.read_body(100) == b"{}"
    assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize(
    "ctype, status",
    [
        (None, 415),  # a cross-site fetch with a Blob body sends none, no preflight
        (b"", 415),
        (b"text/plain", 415),
        (b"application/x-www-form-urlencoded", 415),
        (b"multipart/form-data; boundary=x", 415),
        (b"application/json", None),
        (b"Application/JSON; charset=utf-8", None),
        (b"application/merge-patch+json", None),
    ],
)
def test_a_json_body_needs_a_json_content_type(pair, core, ctype, status):
    conn, client = pair
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    client.sendall(head + b"\r\n{}")
    req = core.Request(core.parse_head(core.read_request_head(conn)), ("1", 2), conn)
    assert status_of(core, req.read_body, 100, True) == status


# --- routing ---


def handler(req, **params):
    return params


def test_the_router_matches_methods_and_named_groups(core):
    router = core.Router(
        [
            ("GET", r"/things/(?P<tid>[^/]+)/?", handler),
            ("PUT", r"/things/(?P<tid>[^/]+)/?", handler),
            ("*", r"/any(/.*)?", handler),
        ]
    )
    found, params = router.match("GET", "/things/7/")
    assert found is handler and params == {"tid": "7"}
    assert router.match("OPTIONS", "/any/x")[0] is handler
    try:
        router.match("DELETE", "/things/7")
    except core.ApiError as exc:
        assert exc.status == 405 and exc.headers == {"Allow": "GET, PUT"}
    else:
        pytest.fail("no 405")
    assert status_of(core, router.match, "GET", "/things") == 404


def test_dispatch_answers_errors_in_json(core, caplog):
    def broken(req):
        raise RuntimeError("secret detail")

    def refused(req):
        raise core.ApiError(503, "busy", {"Retry-After": "1"})

    router = core.Router([("GET", "/broken", broken), ("GET", "/refused", refused)])
    req = type("Req", (), {"method": "GET", "target": "/broken", "path": "/broken"})
    status, body, headers = core.dispatch(router, req)
    assert status == 500 and b"secret" not in body and "secret detail" in caplog.text
    req.path = "/refused"
    status, body, headers = core.dispatch(router, req)
    assert (status, json.loads(body)) == (503, {"error": "busy"})
    assert headers == {"Content-Type": "application/json", "Retry-After": "1"}


# --- the response writer ---


def read_all(client):
    client.settimeout(2)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


def split(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], dict(line.split(": ", 1) for line in lines[1:]), body


def test_a_body_goes_with_its_length_and_the_request_id(pair, core):
    conn, client = pair
    response = core.json_response(201, {"a": 1}, {"Location": "/x"})
    assert core.write_response(conn, response, "rid-1", keep_alive=True) is True
    conn.sock.shutdown(socket.SHUT_WR)
    status, headers, body = split(read_all(client))
    assert status == "HTTP/1.1 201 Created" and body == b'{"a": 1}'
    assert headers["Content-Length"] == "8" and headers["X-Request-Id"] == "rid-1"
    assert headers["Location"] == "/x" and "Connection" not in headers


def test_head_gets_the_length_but_no_body_and_close_is_said(pair, core):
    conn, client = pair
    response = core.Response(299, b"abc", {"Content-Type": "text/plain"})
    assert not core.write_response(conn, response, "r", False, "HEAD")
    conn.sock.shutdown(socket.SHUT_WR)
    status, headers, body = split(read_all(client))
    assert status == "HTTP/1.1 299 " and body == b""
    assert headers["Content-Length"] == "3" and headers["Connection"] == "close"


def pieces(log):
    try:
        yield b"["
        yield b""
        yield b"1]"
    finally:
        log.append("closed")


def test_pieces_are_chunked_for_http11(pair, core):
    conn, client = pair
    log = []
    response = core.Response(200, pieces(log), {"Content-Type": "application/json"})
    assert core.write_response(conn, response, "r", True)
    conn.sock.shutdown(socket.SHUT_WR)
    _, headers, body = split(read_all(client))
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    assert body == b"1\r\n[\r\n2\r\n1]\r\n0\r\n\r\n" and log == ["closed"]


def test_pieces_go_until_the_close_for_http10(pair, core):
    conn, client = pair
    log = []
    response = core.Response(200, pieces(log), {})
    assert not core.write_response(conn, response, "r", True, "GET", "HTTP/1.0")
    conn.sock.shutdown(socket.SHUT_WR)
    _, headers, body = split(read_all(client))
    assert headers["Connection"] == "close" and "Transfer-Encoding" not in headers
    assert body == b"[1]" and log == ["closed"]


def test_a_stream_that_fails_is_cut_short(pair, core):
    conn, client = pair

    def failing():
        yield b"[1"
        raise core.ApiError(503, "database unavailable")

    response = core.Response(200, failing(), {})
    assert core.write_response(conn, response, "r", True) is False
    conn.sock.shutdown(socket.SHUT_WR)
    assert not read_all(client).endswith(b"0\r\n\r\n")


# --- the server ---


def test_over_the_connection_cap_is_503_busy_with_a_request_id(core):
    server = core.Server(("127.0.0.1", 0), core.Router([]))
    last, _ = pair_last = socket.socketpair()
    refused, client = pair_refused = socket.socketpair()
    try:
        for i in range(core.MAX_CONNECTIONS - 1):  # each from its own address
            assert server.verify_request(object(), (f"10.0.{i // 250}.{i % 250}", 1))
        assert server.verify_request(last, ("10.9.9.9", 1))  # the last place
        assert not server.verify_request(refused, ("10.9.9.8", 1))
        status, headers, body = split(client.recv(4096))  # sent without waiting
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert headers["Connection"] == "close" and headers["X-Request-Id"]
        assert json.loads(body) == {"error": "server busy, try again"}
        server.shutdown_request(last)  # frees its place
        assert len(server.clients) == core.MAX_CONNECTIONS - 1
        assert "10.9.9.9" not in server.counts
    finally:
        for sock in (*pair_last, *pair_refused):
            sock.close()
        server.server_close()


@contextlib.contextmanager
def serving(core, per_client):
    """A real server on a free port, answering GET / with 200 {}."""

    def ok(req):
        return core.json_response(200, {})

    server = core.Server(("127.0.0.1", 0), core.Router([("GET", "/", ok)]))
    server.per_client = per_client
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def kept_alive(port, source):
    """A connection from source that has had one 200 and is kept open."""
    sock = socket.create_connection(("127.0.0.1", port), 5, (source, 0))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    return sock


def get_from(port, source):
    """The status line of one GET / from source on a new connection."""
    with socket.create_connection(("127.0.0.1", port), 5, (source, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_all(sock).split(b"\r\n", 1)[0]


def closed_by_server(sock):
    """Whether the server has closed sock (without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


def test_one_address_over_its_cap_cannot_shut_out_another(core, caplog):
    # The reviewer's attack: one address holding every connection the server
    # had, with a request now and then: everyone else got 503 for the whole time.
    with serving(core, per_client=4) as server:
        port = server.server_address[1]
        held = [kept_alive(port, "127.0.0.2") for _ in range(12)]
        try:
            helpers.wait_for(
                lambda: server.counts["127.0.0.2"] <= 4, 5, what="the cap to hold"
            )
            assert get_from(port, "127.0.0.3") == b"HTTP/1.1 200 OK"
            helpers.wait_for(
                lambda: sum(map(closed_by_server, held)) == 8, 5, what="8 closed"
            )
        finally:
            for sock in held:
                sock.close()
    assert server.counts.get("127.0.0.2", 0) <= 4
    assert "127.0.0.2 has 4 connections, its cap: closed an idle one" in caplog.text


def test_at_the_cap_a_new_connection_closes_an_idle_one(core, monkeypatch):
    monkeypatch.setattr(core, "MAX_CONNECTIONS", 6)
    with serving(core, per_client=100) as server:
        port = server.server_address[1]
        held = [kept_alive(port, "127.0.0.2") for _ in range(6)]
        try:
            assert get_from(port, "127.0.0.3") == b"HTTP/1.1 200 OK"
            # One idle connection (the oldest to be idle) was closed for it.
            helpers.wait_for(
                lambda: sum(map(closed_by_server, held)) == 1, 5, what="one closed"
            )
        finally:
            for sock in held:
                sock.close()


def test_a_client_at_its_cap_with_no_idle_connection_gets_429(core):
    with serving(core, per_client=3) as server:
        port = server.server_address[1]
        # Connected, no request yet: not idle, so not closed to make room.
        quiet = [
            socket.create_connection(("127.0.0.1", port), 5, ("127.0.0.2", 0))
            for _ in range(3)
        ]
        try:
            helpers.wait_for(lambda: server.counts["127.0.0.2"] == 3, 5, what="3")
            status = get_from(port, "127.0.0.2")
            assert status == b"HTTP/1.1 429 Too Many Requests"
            assert get_from(port, "127.0.0.3") == b"HTTP/1.1 200 OK"
        finally:
            for sock in quiet:
                sock.close()


# --- ids ---


@pytest.mark.parametrize("bits", [64, 128])
def test_new_ids_are_hex_of_their_size_and_distinct(core, bits):
    ids = [core.new_id(bits) for _ in range(50_000)]
    assert all(re.fullmatch(f"[0-9a-f]{{{bits // 4}}}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def counted_urandom(monkeypatch):
    """Count the calls of os.urandom (uuid4 calls it too) from now on."""
    calls = []
    real = os.urandom

    def counting(size):
        calls.append(size)
        return real(size)

    monkeypatch.setattr(os, "urandom", counting)
    return calls


def test_request_ids_cost_a_system_call_per_512_not_each(core, monkeypatch):
    # getrandom() releases the GIL: under load, one more hand-over per request.
    calls = counted_urandom(monkeypatch)
    ids = [core.request_id(core.Headers([])) for _ in range(2048)]
    assert all(re.fullmatch("[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(calls) <= 5, calls  # 2048 ids of 8 bytes: 16 KiB of 4 KiB draws
    sent = core.Headers([("X-Request-Id", "abc-1")])
    assert core.request_id(sent) == "abc-1"


def test_ids_drawn_by_many_threads_at_once_are_all_distinct(core):
    found = []

    def draw():
        found.extend([core.new_id(64) for _ in range(5000)])

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(found) == 40_000 and len(set(found)) == 40_000


def test_order_ids_cost_a_system_call_per_256_not_each(monkeypatch):
    calls = counted_urandom(monkeypatch)
    ids = []
    publisher = types.SimpleNamespace(publish=lambda body, mid, rid: ids.append(mid))
    body = b'{"user_id": 1, "number_of_items": 2, "total_amount": 3}'
    req = types.SimpleNamespace(
        read_body=lambda limit, json_only=False: body,
        headers=gateway.Headers([]),
        request_id="r",
    )
    for _ in range(512):
        response = gateway.post_billing(req, publisher)
        assert response.headers["X-Message-Id"] == ids[-1]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(calls) <= 3, calls  # 512 ids of 16 bytes: 8 KiB
