"""Hostile HTTP input to gateway and inventory: always a JSON 4xx, nothing changed."""

import collections
import concurrent.futures
import contextlib
import json
import socket
import time
import urllib.parse

import helpers
import pytest


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

    def __init__(self, port, timeout=helpers.REQUEST_TIMEOUT + 8):
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
    gateway = helpers.start_gateway(procs, inventory.port, queue)
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
        post_raw("/api/billing", json.dumps(helpers.order(7)).encode(), length=900),
    )
    for name in hostile.ports:
        for body in BAD_MOVIE_BODIES:
            hostile.expect_error(name, post_raw("/api/movies", body), body[:40])
        for body in (b"{}", b'{"title": "abc', b'{"description": 5}', b"[" * 50_000):
            data = post_raw(f"/api/movies/{victim}", body, method=b"PUT")
            hostile.expect_error(name, data, ("PUT", body[:40]))
        big = b'{"title": "' + b"x" * (2 * helpers.MIB) + b'"}'
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
            or not helpers.REQUEST_TIMEOUT - 1
            <= reply.seconds
            <= helpers.REQUEST_TIMEOUT + 6
        ):
            hostile.problems.append((name, "Content-Length too large", what, reply))
    liars.shutdown()
    cut = max(f.result().seconds for f in lying_up.values() if f.result())
    hostile.finish()
    assert helpers.queue_depth(queue_of(hostile)) == 0
    helpers.figure(
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
    big = json.dumps({**helpers.order(1), "pad": "x" * 70_000}).encode()
    hostile.expect_error("gateway", post_raw("/api/billing", big), "70 KB", {413})
    hostile.finish()
    assert helpers.queue_depth(queue_of(hostile)) == 0
    gateway_url = hostile.services[0].url
    assert helpers.call(gateway_url, "POST", "/api/billing", helpers.order(9))[0] == 200
    assert helpers.queue_depth(queue_of(hostile)) == 1
    helpers.figure(
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
    helpers.figure(
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
    helpers.figure(
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
    helpers.figure(
        "hostile.request_lines",
        gateway_requests=hostile.sent["gateway"],
        inventory_requests=hostile.sent["inventory"],
        all_errors_json_and_closed=True,
    )
