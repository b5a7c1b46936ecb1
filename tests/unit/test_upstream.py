"""The gateway's HTTP client for inventory, tested from bytes, with no socket."""

import contextlib
import http.client
import io
import time
import types

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gateway

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


class _Raw(io.RawIOBase):
    """Bytes that end in EOF, or in an exception as a socket's would."""

    def __init__(self, data, then):
        self.data, self.then = data, then

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.data:
            if self.then is not None:
                raise self.then
            return 0
        size = min(len(buffer), len(self.data))
        buffer[:size] = self.data[:size]
        self.data = self.data[size:]
        return size


class FakeSock:
    """Records what the client sends."""

    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(data)


class FakeLink:
    """A connection to inventory: the answer it gives, what it was sent."""

    def __init__(self, answer, then=None):
        self.sock = FakeSock()
        self.rfile = io.BufferedReader(_Raw(answer, then))  # as socket.makefile
        self.closed = False

    def close(self):
        self.closed = True


def client(*links, size=8, timeout=1.0):
    """An Upstream whose new connections are the given fake links, in order."""
    upstream = gateway.Upstream("inventory", 8080, timeout, size)
    queue = list(links)

    def connect():
        assert queue, "opened more connections than the test expected"
        return queue.pop(0)

    upstream._connect = connect
    return upstream


def get(upstream, method="GET", body=None, headers=None):
    """One request; a chunked body is read to its end."""
    status, fields, data = upstream.request(method, "/api/movies", body, headers or [])
    return status, fields, data if isinstance(data, bytes) else b"".join(data)


def assert_fails(upstream, status=502, method="GET"):
    """The request ends in ApiError with status (inventory failed/timed out)."""
    with pytest.raises(gateway.ApiError) as err:
        get(upstream, method)
    assert err.value.status == status, err.value.message
    return err.value


def json_answer(body, status=b"200 OK", extra=b""):
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


def chunked(*chunks, trailer=b""):
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return (
        OK + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n"
    )


# --- Through Upstream.request, as the handlers use it ---


def test_request_goes_in_one_write():
    link = FakeLink(json_answer(b"{}", b"201 Created"))
    upstream = client(link)
    status, fields, body = get(upstream, "POST", b'{"a": 1}', [("X-Request-Id", "r1")])
    assert (status, body) == (201, b"{}")
    assert fields == [("Content-Length", "2")]
    assert link.sock.sent == [
        b"POST /api/movies HTTP/1.1\r\nHost: inventory:8080\r\nX-Request-Id: r1\r\n"
        b'Content-Length: 8\r\n\r\n{"a": 1}'
    ]


def test_request_without_body_has_no_length():
    link = FakeLink(json_answer(b"[]"))
    get(client(link))
    assert link.sock.sent == [
        b"GET /api/movies HTTP/1.1\r\nHost: inventory:8080\r\n\r\n"
    ]


def test_empty_body_is_sent_with_length_zero():
    link = FakeLink(json_answer(b"{}"))
    get(client(link), "PUT", b"")
    assert link.sock.sent[0].endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "name, value",
    [
        ("X-A", "a\r\nX-Injected: 1"),
        ("X-A", "a\nb"),
        ("X-A", "a\rb"),
        ("X-A", "a\x00b"),
        ("X-A\r\nX-Injected", "1"),
    ],
)
def test_header_injection_is_refused_before_connecting(name, value):
    upstream = client()  # any connection would fail the test
    with pytest.raises(gateway.ApiError) as err:
        get(upstream, headers=[(name, value)])
    assert err.value.status == 400
    assert err.value.message == f"cannot forward header {name}"


def test_kept_alive_connection_is_reused():
    link = FakeLink(json_answer(b'{"id": 1}') + json_answer(b'{"id": 2}'))
    upstream = client(link)
    assert get(upstream)[2] == b'{"id": 1}'
    assert get(upstream)[2] == b'{"id": 2}'
    assert not link.closed


def test_chunks_with_extensions_and_trailers_then_reuse():
    answer = OK + b"Transfer-Encoding: chunked\r\n\r\n"
    answer += b"3;x=1\r\nabc\r\n1 ; y\r\nd\r\n0\r\nT: 1\r\nU: 2\r\n\r\n"
    link = FakeLink(answer + json_answer(b"{}"))
    upstream = client(link)
    status, _, data = upstream.request("GET", "/api/movies", None, [])
    assert status == 200 and not isinstance(data, bytes)
    assert list(data) == [b"abc", b"d"]
    assert get(upstream)[2] == b"{}"
    assert not link.closed


def test_interim_answers_are_skipped():
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: 1\r\n\r\n"
    link = FakeLink(answer + json_answer(b"{}", b"201 Created", b"Location: /7\r\n"))
    status, fields, body = get(client(link))
    assert (status, body) == (201, b"{}")
    assert fields == [("Content-Length", "2"), ("Location", "/7")]


def test_switching_protocols_is_refused():
    link = FakeLink(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
    assert_fails(client(link))
    assert link.closed


@pytest.mark.parametrize(
    "method, answer",
    [
        ("HEAD", OK + b"Transfer-Encoding: chunked\r\n\r\n"),
        ("HEAD", OK + b"Content-Length: 9\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
def test_answers_without_body_read_none(method, answer):
    link = FakeLink(answer + json_answer(b"{}"))
    upstream = client(link)
    assert get(upstream, method)[2] == b""
    assert get(upstream)[2] == b"{}"  # still in step


def test_body_until_close():
    link = FakeLink(OK + b"\r\nall of it")
    assert get(client(link))[2] == b"all of it"
    assert link.closed


@pytest.mark.parametrize(
    "answer",
    [
        json_answer(b"{}", extra=b"Connection: close\r\n"),
        json_answer(b"{}", extra=b"Connection: Keep-Alive, Close\r\n"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_connection_closed_when_inventory_says(answer):
    link = FakeLink(answer)
    assert get(client(link))[2] == b"{}"
    assert link.closed


def test_http10_keep_alive_is_reused():
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
    link = FakeLink(answer * 2)
    upstream = client(link)
    assert get(upstream)[2] == get(upstream)[2] == b"{}"
    assert not link.closed


BAD_HEADS = {
    "garbage": b"garbage\r\n\r\n",
    "no status": b"HTTP/1.1\r\n\r\n",
    "letters": b"HTTP/1.1 abc OK\r\n\r\n",
    "underscore": b"HTTP/1.1 2_00 OK\r\nContent-Length: 0\r\n\r\n",
    "plus": b"HTTP/1.1 +200 OK\r\nContent-Length: 0\r\n\r\n",
    "two digits": b"HTTP/1.1 99 Low\r\nContent-Length: 0\r\n\r\n",
    "four digits": b"HTTP/1.1 1000 High\r\nContent-Length: 0\r\n\r\n",
    "not http": b"XTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http/2": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status line cut": b"HTTP/1.1 200 OK",
    "head cut": OK,
    "head cut in a line": OK + b"Content-Le",
    "no colon": OK + b"Content-Length 2\r\n\r\n{}",
    "space before colon": OK + b"Content-Length : 2\r\n\r\n{}",
    "folded line": OK + b"X-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in a value": OK + b"X-A: 1\x002\r\nContent-Length: 2\r\n\r\n{}",
    "two lengths": OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "a list of lengths": OK + b"Content-Length: 2, 2\r\n\r\n{}",
    "negative length": OK + b"Content-Length: -1\r\n\r\n{}",
    "length with a plus": OK + b"Content-Length: +2\r\n\r\n{}",
    "length with underscore": OK + b"Content-Length: 1_0\r\n\r\n0123456789",
    "length and chunked": OK
    + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "gzip then chunked": OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "unknown coding": OK + b"Transfer-Encoding: gzip\r\n\r\n{}",
    "body cut short": OK + b"Content-Length: 5\r\n\r\n{}",
    "huge length": OK + b"Content-Length: 1000000000000\r\n\r\n{}",
    "endless headers": OK + b"X-A: 1\r\n" * 20_000 + b"Content-Length: 0\r\n\r\n",
    "endless interim answers": b"HTTP/1.1 100 Continue\r\n\r\n" * 5000
    + json_answer(b"{}"),
    "long line": OK + b"X-A: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("answer", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_malformed_answer_is_502(answer):
    link = FakeLink(answer)
    error = assert_fails(client(link))
    assert error.message == "inventory failed"
    assert link.closed


BAD_CHUNKS = {
    "letters": b"zz\r\n",
    "negative": b"-1\r\nabc\r\n0\r\n\r\n",
    "0x prefix": b"0x3\r\nabc\r\n0\r\n\r\n",
    "underscore": b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "space first": b" 3\r\nabc\r\n0\r\n\r\n",
    "empty size": b"\r\nabc\r\n0\r\n\r\n",
    "longer than said": b"3\r\nabcdef\r\n0\r\n\r\n",
    "no CRLF after data": b"3\r\nabc0\r\n\r\n",
    "cut in data": b"5\r\nabc",
    "cut after a chunk": b"3\r\nabc\r\n",
    "no last chunk": b"3\r\nabc\r\n\r\n",
    "cut in trailers": b"0\r\nT: 1\r\n",
    "bad trailer": b"0\r\nno colon\r\n\r\n",
    "huge chunk": b"ffffffffffff\r\nabc\r\n0\r\n\r\n",
    "endless trailers": b"0\r\n" + b"T: 1\r\n" * 20_000 + b"\r\n",
}


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_malformed_chunks_stop_the_relay(body):
    # The status is sent by then: the relay raises what the handler catches
    # (it cuts the client's connection) and the link is not reused.
    link = FakeLink(OK + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    status, _, data = client(link).request("GET", "/api/movies", None, [])
    assert status == 200
    with pytest.raises(http.client.HTTPException):
        list(data)
    assert link.closed


def test_relay_stopped_early_closes_the_link():
    link = FakeLink(chunked(b"abc", b"def"))
    _, _, data = client(link).request("GET", "/api/movies", None, [])
    assert next(data) == b"abc"
    data.close()  # the client went away
    assert link.closed


def test_connections_to_inventory_are_capped_and_freed():
    # Unbounded before: one connection per request in flight, while inventory
    # admits a capped number from the gateway's address.
    links = [FakeLink(chunked(b"a", b"b") * n) for n in (2, 1, 1)]
    upstream = client(*links, size=2, timeout=0.2)
    first = upstream.request("GET", "/api/movies", None, [])[2]
    second = upstream.request("GET", "/api/movies", None, [])[2]
    start = time.monotonic()
    error = assert_fails(upstream, 503)
    assert error.message == "inventory busy, try again"
    assert 0.2 <= time.monotonic() - start < 1.0
    assert b"".join(first) == b"ab"  # read whole: its connection is kept
    assert get(upstream)[2] == b"ab"  # and reused
    second.close()  # before its first chunk: a client gone at once
    assert links[1].closed
    assert get(upstream)[2] == b"ab"  # a new connection: the cap had room again


def test_idle_connections_past_upstream_idle_are_closed_not_kept(monkeypatch):
    links = [FakeLink(json_answer(b"{}") * 2) for _ in range(3)]
    upstream = client(*links)
    now = [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    answers = [upstream.request("GET", "/api/movies", None, []) for _ in range(2)]
    assert [a[0] for a in answers] == [200, 200]
    assert not any(link.closed for link in links)
    now[0] += gateway.UPSTREAM_IDLE + 1
    assert get(upstream)[0] == 200  # on a new connection
    assert links[0].closed  # the idle one went


def test_timeout_is_504():
    link = FakeLink(OK + b"Content-Length: 5\r\n\r\nab", then=TimeoutError())
    error = assert_fails(client(link), 504)
    assert error.message == "inventory timed out"
    assert link.closed


@pytest.mark.parametrize("stale", [b"", ConnectionResetError()])
def test_stale_connection_is_retried_once_on_a_fresh_one(stale):
    if isinstance(stale, bytes):
        first = FakeLink(json_answer(b"{}") + stale)
    else:
        first = FakeLink(json_answer(b"{}"), then=stale)
    fresh = FakeLink(json_answer(b'{"id": 2}'))
    upstream = client(first, fresh)
    get(upstream)
    assert get(upstream)[2] == b'{"id": 2}'
    assert first.closed and not fresh.closed


def test_fresh_connection_closed_at_once_is_502():
    first, fresh = FakeLink(json_answer(b"{}")), FakeLink(b"")
    upstream = client(first, fresh)
    get(upstream)
    assert_fails(upstream)  # and no third connection
    assert first.closed and fresh.closed


def test_idle_connection_is_dropped_after_upstream_idle(monkeypatch):
    first, second = FakeLink(json_answer(b"{}")), FakeLink(json_answer(b"{}"))
    upstream = client(first, second)
    now = 1000.0
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now)
    get(upstream)
    now += gateway.UPSTREAM_IDLE
    get(upstream)
    assert first.closed and not second.closed


# --- Anything inventory may send ---

PIECES = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.0 204 x\r\n",
    b"HTTP/1.1 101 S\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"X-A: 1\r\n",
    b"\r\n",
    b"3\r\nabc\r\n",
    b"0\r\n",
    b"5;e=1\r\n",
]
ANSWERS = st.lists(st.sampled_from(PIECES) | st.binary(max_size=6), max_size=12).map(
    b"".join
)


@settings(max_examples=500, deadline=None)
@given(ANSWERS, st.sampled_from(["GET", "HEAD", "POST"]))
def test_any_answer_is_a_result_or_a_gateway_error(answer, method):
    upstream = client(FakeLink(answer), FakeLink(answer))
    try:
        status, fields, data = upstream.request(method, "/api/movies", None, [])
    except gateway.ApiError as exc:
        assert exc.status == 502
        return
    assert 200 <= status <= 599
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in fields)
    if not isinstance(data, bytes):
        with contextlib.suppress(http.client.HTTPException):
            list(data)


# --- The parts, one by one ---


def reader(data):
    return io.BytesIO(data)


def test_write_request_with_and_without_body():
    data = gateway.write_request("GET", "/x?a=1", "h:1", [("A", "1"), ("B", "")], None)
    assert data == b"GET /x?a=1 HTTP/1.1\r\nHost: h:1\r\nA: 1\r\nB: \r\n\r\n"
    data = gateway.write_request("DELETE", "/x", "h:1", [], b"ab")
    assert data == b"DELETE /x HTTP/1.1\r\nHost: h:1\r\nContent-Length: 2\r\n\r\nab"


def test_write_request_keeps_latin1_values():
    data = gateway.write_request("GET", "/", "h", [("X-A", "caf\xe9")], None)
    assert b"X-A: caf\xe9\r\n" in data


def test_read_head_gives_final_status_version_and_fields():
    rfile = reader(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.0 404 \r\nX-A:  spaced value \t\r\nX-B:\r\n\r\nrest"
    )
    assert gateway.read_head(rfile) == (
        404,
        False,
        [("X-A", "spaced value"), ("X-B", "")],
    )
    assert rfile.read() == b"rest"


def test_read_head_takes_bare_newlines_and_no_reason():
    rfile = reader(b"HTTP/1.1 200\nContent-Length: 0\n\n")
    assert gateway.read_head(rfile) == (200, True, [("Content-Length", "0")])


def test_read_head_tells_a_closed_connection_apart():
    with pytest.raises(gateway.UpstreamClosed):
        gateway.read_head(reader(b""))
    with pytest.raises(gateway.UpstreamError) as err:
        gateway.read_head(reader(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert not isinstance(err.value, gateway.UpstreamClosed)


@pytest.mark.parametrize("answer", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_bad_answers_fail_in_head_framing_or_body(answer):
    rfile = reader(answer)
    with pytest.raises(gateway.UpstreamError):
        status, http11, fields = gateway.read_head(rfile)
        framing, _ = gateway.body_framing("GET", status, http11, fields)
        if framing == gateway.UNTIL_CLOSE:
            gateway.read_until_close(rfile)
        else:
            gateway.read_length(rfile, framing)


def test_head_at_the_size_limit_is_read_and_one_byte_more_is_not():
    fill = gateway.MAX_UPSTREAM_HEAD - len(OK) - len(b"X-A: \r\n\r\n")
    head = OK + b"X-A: " + b"a" * fill + b"\r\n\r\n"
    assert gateway.read_head(reader(head))[0] == 200
    with pytest.raises(gateway.UpstreamError):
        gateway.read_head(reader(head[:-4] + b"a\r\n\r\n"))


def fields(*pairs):
    return [tuple(pair.split(": ")) for pair in pairs]


@pytest.mark.parametrize(
    "method, status, http11, pairs, expected",
    [
        ("GET", 200, True, ["Content-Length: 12"], (12, True)),
        ("GET", 200, True, ["content-length: 0"], (0, True)),
        ("GET", 200, True, ["Transfer-Encoding: Chunked"], ("chunked", True)),
        ("GET", 200, True, [], ("until close", False)),
        ("GET", 200, True, ["Content-Length: 2", "Connection: close"], (2, False)),
        ("GET", 200, False, ["Content-Length: 2"], (2, False)),
        ("GET", 200, False, ["Content-Length: 2", "Connection: Keep-Alive"], (2, True)),
        (
            "GET",
            200,
            True,
            ["Connection: keep-alive, close", "Content-Length: 1"],
            (1, False),
        ),
        ("HEAD", 200, True, ["Transfer-Encoding: chunked"], (0, True)),
        ("HEAD", 200, True, [], (0, True)),
        ("GET", 204, True, [], (0, True)),
        ("POST", 304, True, ["Content-Length: 5"], (0, True)),
        (
            "HEAD",
            200,
            True,
            ["Content-Length: 1", "Transfer-Encoding: chunked"],
            (0, True),
        ),
    ],
)
def test_body_framing(method, status, http11, pairs, expected):
    framing = gateway.body_framing(method, status, http11, fields(*pairs))
    assert framing == expected


@pytest.mark.parametrize(
    "pairs",
    [
        ["Content-Length: 1", "Content-Length: 1"],
        ["Content-Length: 1", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: gzip"],
        ["Transfer-Encoding: chunked, gzip"],
        ["Content-Length: 1,1"],
        ["Content-Length: x"],
        ["Content-Length: "],
        ["Content-Length: \u0661"],
        ["Content-Length: " + "9" * 19],
    ],
)
def test_body_framing_refuses_ambiguity(pairs):
    with pytest.raises(gateway.UpstreamError):
        gateway.body_framing("GET", 200, True, fields(*pairs))


def test_read_length_reads_exactly_and_refuses_short_or_oversized():
    rfile = reader(b"abcdef")
    assert gateway.read_length(rfile, 4) == b"abcd"
    assert gateway.read_length(rfile, 0) == b""
    with pytest.raises(gateway.UpstreamError):
        gateway.read_length(rfile, 3)
    with pytest.raises(gateway.UpstreamError):
        gateway.read_length(reader(b"x"), gateway.MAX_UPSTREAM_BODY + 1)


def test_read_until_close_and_its_limit():
    assert gateway.read_until_close(reader(b"a\r\nb")) == b"a\r\nb"
    big = b"x" * gateway.MAX_UPSTREAM_BODY
    assert len(gateway.read_until_close(reader(big))) == len(big)
    with pytest.raises(gateway.UpstreamError):
        gateway.read_until_close(reader(big + b"x"))


def drain(generator):
    """(chunks, trailers) of a read_chunks generator."""
    chunks = []
    while True:
        try:
            chunks.append(next(generator))
        except StopIteration as stop:
            return chunks, stop.value


def test_read_chunks_yields_chunks_and_returns_trailers():
    rfile = reader(b"3;a=b\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: 1\r\nU:2\r\n\r\nnext")
    assert drain(gateway.read_chunks(rfile)) == (
        [b"abc", b"0123456789"],
        [("T", "1"), ("U", "2")],
    )
    assert rfile.read() == b"next"


def test_read_chunks_is_lazy():
    rfile = reader(b"1\r\na\r\n1\r\nb\r\n")  # no last chunk yet
    chunks = gateway.read_chunks(rfile)
    assert next(chunks) == b"a"
    assert rfile.tell() == len(b"1\r\na\r\n")


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_read_chunks_refuses(body):
    with pytest.raises(gateway.UpstreamError):
        drain(gateway.read_chunks(reader(body)))


# --- Any bytes: a result or UpstreamError, nothing else ---

HEADS = st.lists(st.sampled_from(PIECES) | st.binary(max_size=6), max_size=12).map(
    b"".join
)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200) | HEADS)
def test_read_head_any_bytes(data):
    try:
        status, http11, pairs = gateway.read_head(reader(data))
    except gateway.UpstreamError:
        return
    assert 200 <= status <= 599 and isinstance(http11, bool)
    for name, value in pairs:
        assert name and ":" not in name and not set(value) & set("\r\n\x00")


FIELD_TEXT = st.text(
    st.sampled_from("aZ09-:, \t\r\n\x00\xe9chunkedlosCNT"), max_size=20
)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(["GET", "HEAD"]),
    st.integers(100, 599),
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection"])
            | FIELD_TEXT,
            FIELD_TEXT,
        ),
        max_size=4,
    ),
)
def test_body_framing_any_fields(method, status, http11, pairs):
    try:
        framing, keep = gateway.body_framing(method, status, http11, pairs)
    except gateway.UpstreamError:
        return
    assert framing in (gateway.CHUNKED, gateway.UNTIL_CLOSE) or framing >= 0
    assert isinstance(keep, bool)


CHUNK_PIECES = [b"3\r\n", b"abc", b"\r\n", b"0\r\n", b"1;x=y\r\n", b"T: 1\r\n", b"a"]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from(CHUNK_PIECES) | st.binary(max_size=5), max_size=10).map(
        b"".join
    )
)
def test_read_chunks_any_bytes(data):
    try:
        chunks, trailers = drain(gateway.read_chunks(reader(data)))
    except gateway.UpstreamError:
        return
    assert all(chunks) and sum(map(len, chunks)) <= len(data)
    assert isinstance(trailers, list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.integers(0, 120))
def test_read_length_any_bytes(data, length):
    try:
        assert gateway.read_length(reader(data), length) == data[:length]
    except gateway.UpstreamError:
        assert len(data) < length


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.binary(max_size=9))
def test_chunked_round_trip(chunks, after):
    data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    rfile = reader(data + after)
    assert drain(gateway.read_chunks(rfile)) == (chunks, [])
    assert rfile.read() == after


# --- Through the handler ---


def test_headers_a_connection_line_names_are_not_forwarded_either_way():
    private = b"Connection: X-Private\r\nX-Private: 1\r\nX-Kept: 2\r\n"
    link = FakeLink(json_answer(b"{}", extra=private))
    pairs = [
        ("Host", "x"),
        ("Connection", "X-Secret , keep-alive"),
        ("X-Secret", "s"),
        ("X-Other", "o"),
    ]
    req = types.SimpleNamespace(
        method="GET",
        length=0,
        headers=gateway.Headers(pairs),
        client=("192.0.2.1", 5),
        request_id="r1",
        target="/api/movies",
    )
    response = gateway.proxy_movies(req, client(link))
    sent = b"".join(link.sock.sent)
    assert b"X-Secret" not in sent and b"keep-alive" not in sent.lower(), sent
    assert b"X-Other: o\r\n" in sent
    assert response.headers.get("X-Kept") == "2"
    assert "X-Private" not in response.headers


# --- Several inventories (INVENTORY_HOSTS) ---


class FakeInventory:
    """One inventory: answers 200, or fails as the test tells it."""

    def __init__(self, name):
        self.name, self.failure, self.sent = name, None, []
        self.host, self.port = name, 8080

    def request(self, method, path, body, headers):
        if isinstance(self.failure, gateway.Unreachable):
            raise self.failure  # never reached: nothing was sent
        self.sent.append(method)
        if self.failure is not None:
            raise self.failure
        return gateway.Answer(200, [("X-From", self.name)], b"{}")


def inventories(count=2):
    fakes = [FakeInventory(f"inv{i}") for i in range(count)]
    return fakes, gateway.Upstreams(fakes)


UNREACHABLE = gateway.Unreachable(502, "inventory unreachable")
DROPPED = gateway.ApiError(502, "inventory failed")
TIMED_OUT = gateway.ApiError(504, "inventory timed out")


def served_by(upstreams, method="GET"):
    return dict(upstreams.request(method, "/api/movies", None, []).fields)["X-From"]


def test_requests_take_the_inventories_in_turn():
    _, upstreams = inventories()
    assert [served_by(upstreams) for _ in range(4)] == ["inv0", "inv1", "inv0", "inv1"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_an_unreachable_inventory_is_passed_over_for_any_method(method):
    fakes, upstreams = inventories()
    fakes[0].failure = UNREACHABLE
    assert {served_by(upstreams, method) for _ in range(4)} == {"inv1"}
    assert fakes[1].sent == [method] * 4


def test_a_dead_inventory_is_left_out_then_tried_again(monkeypatch):
    fakes, upstreams = inventories()
    now = [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    fakes[0].failure = UNREACHABLE
    assert served_by(upstreams) == "inv1"  # inv0 failed, marked down
    calls = []
    fakes[0].request = lambda *args: calls.append(args) or 1 / 0
    assert {served_by(upstreams) for _ in range(6)} == {"inv1"}
    assert calls == []  # not even tried while down
    now[0] += gateway.DOWN_FOR + 0.1
    del fakes[0].request
    fakes[0].failure = None  # revived
    assert {served_by(upstreams) for _ in range(4)} == {"inv0", "inv1"}


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_an_idempotent_request_inventory_dropped_goes_to_the_other(method):
    fakes, upstreams = inventories()
    fakes[0].failure = DROPPED
    assert served_by(upstreams, method) == "inv1"
    assert fakes[0].sent == fakes[1].sent == [method]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_request_that_may_have_reached_an_inventory_is_not_sent_again(method):
    fakes, upstreams = inventories()
    fakes[0].failure = DROPPED
    with pytest.raises(gateway.ApiError) as failed:
        upstreams.request(method, "/api/movies", b"{}", [])
    assert failed.value.status == 502
    assert fakes[0].sent == [method] and fakes[1].sent == []


def test_a_timeout_is_not_waited_for_twice_but_marks_the_inventory_down():
    fakes, upstreams = inventories()
    fakes[0].failure = TIMED_OUT
    with pytest.raises(gateway.ApiError) as failed:
        upstreams.request("GET", "/api/movies", None, [])
    assert failed.value.status == 504 and fakes[1].sent == []
    assert {served_by(upstreams) for _ in range(3)} == {"inv1"}


def test_all_down_answers_the_last_error():
    fakes, upstreams = inventories()
    for fake in fakes:
        fake.failure = UNREACHABLE
    with pytest.raises(gateway.ApiError) as failed:
        upstreams.request("GET", "/api/movies", None, [])
    assert failed.value.status == 502
    fakes[1].failure = None  # all marked down: still tried, not refused outright
    assert served_by(upstreams) == "inv1"


FAILURES = st.sampled_from([None, None, UNREACHABLE, DROPPED, TIMED_OUT])
METHODS = st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"])


@given(st.lists(st.tuples(METHODS, st.lists(FAILURES, min_size=3, max_size=3))))
@settings(max_examples=300, deadline=None)
def test_a_request_reaches_a_second_inventory_only_if_idempotent_or_unsent(steps):
    fakes, upstreams = inventories(3)
    for method, failures in steps:
        for fake, failure in zip(fakes, failures, strict=True):
            fake.failure, fake.sent = failure, []
        try:
            upstreams.request(method, "/api/movies", None, [])
            answered = True
        except gateway.ApiError:
            answered = False
        reached = sum(len(fake.sent) for fake in fakes)
        assert all(len(fake.sent) <= 1 for fake in fakes)
        if method not in gateway.IDEMPOTENT:
            assert reached <= 1
        if answered:
            assert any(fake.failure is None and fake.sent for fake in fakes)
        elif (
            all(f is not None for f in failures) is False and TIMED_OUT not in failures
        ):
            # Some inventory would have answered: only a POST that may have
            # reached a failing one is allowed to fail.
            assert method not in gateway.IDEMPOTENT and reached == 1
