"""Gateway: the public entry point of the movie shop.

Routes (a trailing slash is accepted on each):
    *    /api/movies...   proxied as is to inventory over HTTP
    POST /api/billing     validated, then published to the billing queue;
                          200 only once RabbitMQ has confirmed the message
    GET  /health          whether orders are taken (RabbitMQ), inventory answers
                          and billing consumes the queue
    GET  /openapi.yaml    the API description; GET /docs shows it in a browser

Settings (environment, then .env beside this file): GATEWAY_HOST, GATEWAY_PORT,
INVENTORY_HOST, INVENTORY_PORT, INVENTORY_TIMEOUT, RABBITMQ_HOST, RABBITMQ_PORT,
RABBITMQ_GATEWAY_USER, RABBITMQ_GATEWAY_PASSWORD, RABBITMQ_QUEUE; optional
LOG_LEVEL (INFO), RABBITMQ_HOSTS (a cluster's nodes, tried in turn),
INVENTORY_HOSTS (several inventories on INVENTORY_PORT, taken in turn).

Every answer carries an X-Request-Id (the client's, if sane), also sent to
inventory and written in the access line (LOG_LEVEL=DEBUG). POST /api/billing
answers the order's message id in X-Message-Id and logs it with the request id;
billing logs it too.

A request's path through this file:
    accept   Server.verify_request: the connection caps (per address, in all)
    head     Handler.handle_one -> read_request_head, parse_head -> Request
    route    dispatch -> Router.match -> a handler (build_routes)
    proxy    proxy_movies -> Upstream.request (a pooled keep-alive connection)
    publish  post_billing -> check_order -> Publisher.publish (waits for the confirm)
    answer   write_response: one write, or chunks as inventory sends them
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import email.utils
import functools
import hashlib
import http.client
import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator
from concurrent.futures import Future
from decimal import Decimal
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from socketserver import StreamRequestHandler
from typing import Any
from typing import NamedTuple
from typing import Protocol
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pika
from dotenv import load_dotenv
from pika.adapters.select_connection import IOLoop
from pika.exceptions import AMQPError
from pika.spec import Basic

log = logging.getLogger("gateway")

HERE = Path(__file__).resolve().parent
SPEC_FILE = HERE / "openapi.yaml"
DOCS_ASSETS = HERE / "node_modules" / "swagger-ui-dist"
MAX_PROXY_BODY = 1024 * 1024  # inventory's own limit
REQUEST_TIMEOUT = 10  # seconds a client has to send a whole request
# A request line and headers together; browsers and curl stay under 16 KiB
# (nginx refuses beyond 32 KiB by default), so only an abuse reaches it.
MAX_HEAD = 64 * 1024
SHUTDOWN_GRACE = 3  # seconds for requests in flight at SIGTERM (PM2 kills at 5)
MAX_CONNECTIONS = 512  # open client connections, one thread each
PUBLISH_TIMEOUT = 4  # seconds to wait for RabbitMQ's confirm before 503
UPSTREAM_IDLE = 4  # seconds an idle upstream connection is kept (inventory: 10)
# One line per request (method, path, status, duration, request id): at INFO
# it costs a measurable share of W1's throughput (bench/HISTORY.md), so
# LOG_LEVEL=DEBUG only.
ACCESS_LEVEL = logging.DEBUG
SERVER_VERSION = "gateway/1.0"
QUEUE_STATE_AGE = 1.0  # seconds /health reuses its reading of the billing queue
QUEUE_STATE_WAIT = 1.0  # seconds /health waits for RabbitMQ to tell it
NO_ANSWER = "RabbitMQ did not answer in time"
# /health asks inventory's /health on connections of its own, with this
# timeout: a hung inventory shows at once, not after INVENTORY_TIMEOUT.
HEALTH_TIMEOUT = 2.0
HEALTH_CONNECTIONS = 2
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",  # answered here: inventory gets the whole request at once
    "x-request-id",  # replaced by this request's own id
}
DROP_FROM_UPSTREAM = HOP_BY_HOP | {"server", "date"}
_CONTROL_IN_VALUE = re.compile(r"[\r\n\x00]")  # never forwarded raw
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII

# --- shared: order (identical in gateway.py, billing.py) ---
# What an order is: both check it, the gateway before publishing and billing
# before storing (billing_schema.sql: integer columns, numeric(12, 2)).
MAX_ORDER_BODY = 64 * 1024  # bytes; one order is ~80
MAX_DB_INT = 2**31 - 1
MAX_AMOUNT = Decimal("9999999999.99")
CENTS = Decimal("0.01")  # total_amount's scale
ORDER_FIELDS = ("user_id", "number_of_items", "total_amount")
_INTEGER = re.compile(r"[0-9]{1,10}")
_AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")
# The gateway's two forms of message id: random, or from an Idempotency-Key.
_RANDOM_ID = re.compile(r"[0-9a-f]{32}")
_KEYED_ID = re.compile(r"key:[0-9]{1,10}:[0-9a-f]{16}:([\x21-\x7e]{1,200})")

Order = tuple[int, int, Decimal]  # user_id, number_of_items, total_amount


class InvalidOrder(Exception):
    """An order the shop refuses; the message says why."""


def check_order(data: dict[str, Any]) -> Order:
    """Check an order object: exactly the three fields, each valid."""
    unknown = sorted(set(data) - set(ORDER_FIELDS))
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 80 else unknown[0][:80] + "..."
        raise InvalidOrder(f"unknown field '{name}'")
    for field in ORDER_FIELDS:
        if field not in data:
            raise InvalidOrder(f"'{field}' is required")
    return (
        check_positive_int(data["user_id"], "user_id"),
        check_positive_int(data["number_of_items"], "number_of_items"),
        check_amount(data["total_amount"], "total_amount"),
    )


def check_positive_int(value: object, field: str) -> int:
    """Accept a positive integer, as a JSON number or a string of digits."""
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_DB_INT:
        raise InvalidOrder(
            f"'{field}' must be a positive integer (at most {MAX_DB_INT})"
        )
    return value


def check_amount(value: object, field: str) -> Decimal:
    """Accept an amount >= 0 with at most two decimals, as a number or string;
    return it with exactly two (1.000...0 has a scale PostgreSQL refuses)."""
    if isinstance(value, str) and _AMOUNT.fullmatch(value):
        value = Decimal(value)
    if type(value) is int:
        value = Decimal(value)
    if (
        not isinstance(value, Decimal)
        or not value.is_finite()
        or not 0 <= value <= MAX_AMOUNT
        or value != value.quantize(CENTS, rounding="ROUND_DOWN")
    ):
        raise InvalidOrder(
            f"'{field}' must be an amount from 0 to {MAX_AMOUNT}, 2 decimals"
        )
    return value.quantize(CENTS)


def keyed_message_id(order: Order, key: str) -> str:
    """The message id of an order sent with an Idempotency-Key. It names the
    order's content: a retry of the same order has the same id (stored once),
    another order under the same key has its own (stored too)."""
    digest = hashlib.sha256(f"{order[0]}:{order[1]}:{order[2]}".encode())
    return f"key:{order[0]}:{digest.hexdigest()[:16]}:{key}"


def check_message_id(message_id: object, order: Order) -> None:
    """Refuse a message id the gateway would not have given this order."""
    if isinstance(message_id, str) and _RANDOM_ID.fullmatch(message_id):
        return
    keyed = _KEYED_ID.fullmatch(message_id) if isinstance(message_id, str) else None
    if keyed is None or message_id != keyed_message_id(order, keyed.group(1)):
        raise InvalidOrder("message id not one the gateway gives this order")


# --- end of shared: order ---

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Movie shop API gateway - API docs</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="/docs/favicon-16x16.png" sizes="16x16">
  <style>body { margin: 0; }</style>
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script>
    window.addEventListener("load", function () {
      window.ui = SwaggerUIBundle({
        url: "/openapi.yaml",
        dom_id: "#swagger-ui",
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        plugins: [SwaggerUIBundle.plugins.DownloadUrl],
        layout: "StandaloneLayout",
        validatorUrl: null
      });
    });
  </script>
</body>
</html>
"""
# The files of swagger-ui-dist the page loads, and no other (its package.json,
# source maps and the rest are not served).
DOCS_FILES = frozenset(re.findall(r'"/docs/([^"/]+)"', DOCS_PAGE))

# --- Config ---

REQUIRED = (
    "GATEWAY_HOST",
    "GATEWAY_PORT",
    "INVENTORY_HOST",
    "INVENTORY_PORT",
    "INVENTORY_TIMEOUT",
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_GATEWAY_USER",
    "RABBITMQ_GATEWAY_PASSWORD",
    "RABBITMQ_QUEUE",
)


# --- shared: config (identical in gateway.py, inventory.py, billing.py) ---
def load_config(name: str, required: tuple[str, ...]) -> dict[str, str]:
    """Read settings from the environment (and .env); exit if any is missing."""
    load_dotenv(HERE / ".env")
    missing = [k for k in required if not os.environ.get(k)]
    if missing:
        sys.exit(f"{name}: missing settings: {', '.join(missing)}")
    return {k: os.environ[k] for k in required}


# --- end of shared: config ---


# --- shared: amqp (identical in gateway.py, billing.py) ---
ACCESS_REFUSED = 403  # AMQP reply code: the user lacks the right
STACK_TIMEOUT = 5  # seconds a connection attempt may take, TCP to AMQP open
BACKOFF_FIRST = 0.5  # seconds to wait after a failure
BACKOFF_MAX = 5  # seconds between two attempts, at most
BACKOFF_RESET = 2 * STACK_TIMEOUT  # an attempt that lasted this long had worked


DELIVERY_LIMIT = 20  # deliveries of one message a quorum queue allows


def queue_arguments(queue: str) -> dict[str, str | int]:
    """The billing queue's arguments: what billing rejects goes to <queue>.dead.

    RABBITMQ_QUEUE_TYPE=quorum (a cluster's) makes it a quorum queue, which
    also dead-letters a message delivered DELIVERY_LIMIT times, at least once
    (that strategy needs reject-publish); classic (the default) as before.
    """
    arguments: dict[str, str | int] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dead",
    }
    kind = os.environ.get("RABBITMQ_QUEUE_TYPE") or "classic"
    if kind == "quorum":
        arguments["x-queue-type"] = "quorum"
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
        arguments["x-delivery-limit"] = DELIVERY_LIMIT
    elif kind != "classic":
        sys.exit(f"RABBITMQ_QUEUE_TYPE={kind}: use classic or quorum")
    return arguments


def connection_parameters(
    config: dict[str, str], service: str, **extra: Any
) -> list[pika.ConnectionParameters]:
    """pika's settings for the service's RabbitMQ user, one per node: those of
    RABBITMQ_HOSTS (comma-separated) if it is set, else RABBITMQ_HOST."""
    prefix = f"RABBITMQ_{service.upper()}"
    hosts = os.environ.get("RABBITMQ_HOSTS") or config["RABBITMQ_HOST"]
    return [
        pika.ConnectionParameters(
            host=host.strip(),
            port=int(config["RABBITMQ_PORT"]),
            credentials=pika.PlainCredentials(
                config[f"{prefix}_USER"], config[f"{prefix}_PASSWORD"]
            ),
            heartbeat=30,
            socket_timeout=3,
            stack_timeout=STACK_TIMEOUT,
            connection_attempts=1,
            client_properties={"connection_name": service},
            **extra,
        )
        for host in hosts.split(",")
        if host.strip()
    ]


class Nodes:
    """RabbitMQ's nodes, taken in turn: each connection attempt goes to the
    next, so a node that went away (or shut down) is not the one tried again."""

    def __init__(
        self, params: pika.ConnectionParameters | list[pika.ConnectionParameters]
    ) -> None:
        self.params = params if isinstance(params, list) else [params]
        self._turn = 0

    def take(self) -> pika.ConnectionParameters:
        """The next node's settings."""
        params = self.params[self._turn % len(self.params)]
        self._turn += 1
        return params


class Backoff:
    """Doubling waits between attempts, capped; an attempt that lasted resets them.

    start() as an attempt begins, failed() when it has ended: the wait is
    BACKOFF_FIRST again if the attempt lasted BACKOFF_RESET seconds (longer
    than any failed connection attempt), else twice the last, at most BACKOFF_MAX.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._next = BACKOFF_FIRST

    def start(self) -> None:
        """Note that an attempt begins (before connecting, say)."""
        self._started = self._clock()

    def failed(self) -> float:
        """Seconds to wait before the next attempt, now that this one has ended."""
        if self._clock() - self._started >= BACKOFF_RESET:
            self._next = BACKOFF_FIRST
        wait = self._next
        self._next = min(wait * 2, BACKOFF_MAX)
        return wait


# --- end of shared: amqp ---


# --- Errors and validation ---


def _bad(message: str) -> ApiError:
    """Return a 400 error."""
    return ApiError(HTTPStatus.BAD_REQUEST, message)


def validate_order(data: dict[str, Any]) -> Order:
    """Check an order object (the shared check_order); 400 with its reason."""
    try:
        return check_order(data)
    except InvalidOrder as exc:
        raise _bad(str(exc)) from None


def idempotency_key(headers: Headers) -> str | None:
    """The request's Idempotency-Key header (or None); 400 if malformed."""
    keys = headers.get_all("Idempotency-Key") or []
    if len(keys) > 1:
        raise _bad("send one Idempotency-Key header, not several")
    if keys and not _IDEMPOTENCY_KEY.fullmatch(keys[0]):
        raise _bad("Idempotency-Key must be 1 to 200 visible ASCII characters")
    return keys[0] if keys else None


def _decimal(text: str) -> Decimal:
    """A JSON number with a fraction or exponent, as a Decimal; ValueError if absurd."""
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent beyond what Decimal can hold
        raise ValueError(f"number {text[:20]}... is out of range") from None


# --- Inventory upstream ---

# Parsing never touches a socket, as in h11: write_request makes the bytes,
# read_head reads the final head, body_framing says how the body ends, and one
# reader per framing reads it. What breaks HTTP/1.1 raises UpstreamError.
MAX_UPSTREAM_HEAD = 64 * 1024  # an answer's heads, 1xx included; its trailers
MAX_UPSTREAM_BODY = 16 * 1024 * 1024  # a body of known length, a chunk, or to close
CHUNKED = "chunked"
UNTIL_CLOSE = "until close"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?\r?\n")
_FIELD_LINE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)\r?\n"
)  # greedy, then rstrip: a lazy value costs 4 times as much
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r?\n")
_LENGTH = re.compile(r"[0-9]{1,18}")

Fields = list[tuple[str, str]]


class UpstreamError(http.client.HTTPException):
    """Inventory's answer is not HTTP/1.1 the gateway can relay."""


class UpstreamClosed(UpstreamError):
    """Inventory closed the connection before answering."""


class _Reader(Protocol):
    """A buffered binary reader: a socket's makefile("rb"), or io.BytesIO."""

    def readline(self, size: int = -1, /) -> bytes: ...

    def read(self, size: int = -1, /) -> bytes: ...


def write_request(
    method: str, target: str, host: str, headers: Fields, body: bytes | None
) -> bytes:
    """A request's bytes, head and body for one write; refuse CR, LF or NUL."""
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        line = f"{name}: {value}"
        if _CONTROL_IN_VALUE.search(line):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"cannot forward header {name}")
        head.append(line)
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    head.append("\r\n")  # joined: the blank line that ends the head
    data = "\r\n".join(head).encode("latin-1")
    return data + body if body else data


def read_head(rfile: _Reader) -> tuple[int, bool, Fields]:
    """Read up to the final answer's head: (status, HTTP/1.1?, fields); skip 1xx."""
    left = MAX_UPSTREAM_HEAD
    while True:
        line = rfile.readline(left)
        if not line and left == MAX_UPSTREAM_HEAD:
            raise UpstreamClosed("closed before answering")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise UpstreamError(f"bad status line {line[:80]!r}")
        fields, left = read_fields(rfile, left - len(line))
        status = int(match[2])
        if status >= 200:
            return status, match[1] == b"1", fields
        if status == 101:
            raise UpstreamError("inventory switched protocols")


def read_fields(rfile: _Reader, left: int) -> tuple[Fields, int]:
    """Read header (or trailer) lines up to a blank one, within left bytes."""
    fields: Fields = []
    while True:
        line = rfile.readline(left)
        left -= len(line)
        if line == b"\r\n" or line == b"\n":
            return fields, left
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise UpstreamError(f"bad header line {line[:80]!r}")
        name, value = match.groups()
        fields.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))


def body_framing(
    method: str, status: int, http11: bool, fields: Fields
) -> tuple[int | str, bool]:
    """How the body ends (its length, CHUNKED or UNTIL_CLOSE); keep the connection?"""
    length = coding = None
    keep = http11
    for name, value in fields:
        lower = name.lower()
        if lower == "content-length":
            if length is not None:
                raise UpstreamError("two Content-Length fields")
            length = value
        elif lower == "transfer-encoding":
            if coding is not None:
                raise UpstreamError("two Transfer-Encoding fields")
            coding = value
        elif lower == "connection":
            tokens = [token.strip().lower() for token in value.split(",")]
            keep = "close" not in tokens and (http11 or "keep-alive" in tokens)
    if method == "HEAD" or status in (204, 304):
        return 0, keep  # no body, whatever the fields announce
    if coding is not None:
        if length is not None or coding.lower() != CHUNKED:
            raise UpstreamError(f"framing refused: {coding}, length {length}")
        return CHUNKED, keep
    if length is None:
        return UNTIL_CLOSE, False
    if not _LENGTH.fullmatch(length):
        raise UpstreamError(f"bad Content-Length {length[:80]!r}")
    return int(length), keep


def read_length(rfile: _Reader, length: int) -> bytes:
    """Read a body of exactly length bytes."""
    if length > MAX_UPSTREAM_BODY:
        raise UpstreamError(f"body of {length} bytes is over {MAX_UPSTREAM_BODY}")
    data = rfile.read(length)
    if len(data) < length:
        raise UpstreamError(f"body cut short at {len(data)} of {length} bytes")
    return data


def read_until_close(rfile: _Reader) -> bytes:
    """Read a body that ends when inventory closes the connection."""
    data = rfile.read(MAX_UPSTREAM_BODY + 1)
    if len(data) > MAX_UPSTREAM_BODY:
        raise UpstreamError(f"body over {MAX_UPSTREAM_BODY} bytes")
    return data


def read_chunks(rfile: _Reader) -> Generator[bytes, None, Fields]:
    """Yield a chunked body's chunks as they come; return its trailers."""
    while True:
        line = rfile.readline(MAX_UPSTREAM_HEAD)
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise UpstreamError(f"bad chunk size line {line[:80]!r}")
        size = int(match[1], 16)
        if size == 0:
            return read_fields(rfile, MAX_UPSTREAM_HEAD)[0]
        data = read_length(rfile, size)
        if rfile.read(2) != b"\r\n":
            raise UpstreamError("chunk longer than its size, or cut short")
        yield data


class Answer(NamedTuple):
    """Inventory's answer: its status, header fields, and body (bytes, or the
    chunks as they come)."""

    status: int
    fields: Fields
    body: bytes | Iterator[bytes]


DOWN_FOR = 2.0  # seconds a failed inventory is left out (of several)
CHECK_EVERY = 1.0  # seconds between two checks of each inventory (of several)
CONNECT_TIMEOUT = 3.0  # seconds to open a connection to inventory, at most
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # RFC 9110


class Upstream:
    """Keep-alive HTTP connections to inventory, shared by request threads.

    At most `size` at once, inventory's cap for one address: a request that
    finds them all in use waits up to the timeout, then answers 503. An idle
    connection is reused newest first (the least likely to have gone stale);
    those idle past UPSTREAM_IDLE are closed.
    """

    def __init__(self, host: str, port: int, timeout: float, size: int) -> None:
        self.host, self.port, self.timeout, self.size = host, port, timeout, size
        self._idle: collections.deque[tuple[_Link, float]] = collections.deque()
        self._in_use = 0  # connections lent to requests, at most size
        self._cond = threading.Condition(threading.Lock())  # _idle and _in_use

    def _connect(self) -> _Link:
        """Open a new connection; raise ApiError 502 when inventory is down."""
        try:
            address = (self.host, self.port)
            sock = socket.create_connection(address, min(self.timeout, CONNECT_TIMEOUT))
        except OSError as exc:
            log.warning("inventory %s:%s unreachable: %s", self.host, self.port, exc)
            raise Unreachable(HTTPStatus.BAD_GATEWAY, "inventory unreachable") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking, with the kernel's timeouts: no poll() before each call.
        sock.settimeout(None)
        _set_timeout(sock, socket.SO_RCVTIMEO, self.timeout)
        _set_timeout(sock, socket.SO_SNDTIMEO, self.timeout)
        return _Link(sock)

    def _take(self) -> _Link | None:
        """Take a place, then the most recent idle connection, or None for a new
        one; close those too old. 503 if no place frees up within the timeout."""
        stale, deadline = [], 0.0
        with self._cond:
            while self._in_use >= self.size:
                deadline = deadline or time.monotonic() + self.timeout
                if not self._cond.wait(deadline - time.monotonic()):
                    log.warning("inventory busy: all %d connections in use", self.size)
                    raise ApiError(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        "inventory busy, try again",
                        {"Retry-After": "1"},
                    )
            self._in_use += 1
            now = time.monotonic()
            while self._idle and now - self._idle[0][1] >= UPSTREAM_IDLE:
                stale.append(self._idle.popleft()[0])
            conn = self._idle.pop()[0] if self._idle else None
        for old in stale:
            old.close()
        return conn

    def request(
        self, method: str, path: str, body: bytes | None, headers: Fields
    ) -> Answer:
        """Send one request; return (status, headers, body or its chunks)."""
        data = write_request(method, path, f"{self.host}:{self.port}", headers, body)
        conn = self._take()
        try:
            return self._send(conn, method, data)
        except BaseException:
            self._free()
            raise

    def _send(self, conn: _Link | None, method: str, data: bytes) -> Answer:
        """request() once it holds a place (conn: an idle connection, or None),
        which _release gives back."""
        if conn is not None:
            try:
                return self._exchange(conn, method, data)
            except (UpstreamClosed, ConnectionError):
                conn.close()  # went stale while idle: retry once on a fresh one
        conn = self._connect()
        try:
            return self._exchange(conn, method, data)
        except (UpstreamClosed, ConnectionError) as exc:
            conn.close()
            log.warning("inventory dropped the connection: %s", exc)
            raise ApiError(HTTPStatus.BAD_GATEWAY, "inventory failed") from None

    def _exchange(self, conn: _Link, method: str, data: bytes) -> Answer:
        """Send data in one write and read the answer; keep conn if reusable."""
        try:
            conn.sock.sendall(data)
            status, http11, fields = read_head(conn.rfile)
            framing, keep = body_framing(method, status, http11, fields)
            if framing == CHUNKED:
                return Answer(status, fields, _Relay(self, conn, keep))
            if isinstance(framing, int):
                body = read_length(conn.rfile, framing)
            else:
                body = read_until_close(conn.rfile)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO
            conn.close()
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, "inventory timed out") from None
        except (UpstreamClosed, ConnectionError):
            raise  # request decides: retry or 502
        except (OSError, UpstreamError) as exc:
            conn.close()
            log.warning("inventory failed: %s", exc)
            raise ApiError(HTTPStatus.BAD_GATEWAY, "inventory failed") from None
        self._release(conn, keep)
        return Answer(status, fields, body)

    def _release(self, conn: _Link, keep: bool) -> None:
        """Keep conn for the next request, unless it is to be closed; free its place."""
        if not keep:
            conn.close()
        with self._cond:
            if keep:
                self._idle.append((conn, time.monotonic()))
            self._in_use -= 1
            self._cond.notify()

    def _free(self) -> None:
        """Give back the place of a request that failed (its connection closed)."""
        with self._cond:
            self._in_use -= 1
            self._cond.notify()


class Upstreams:
    """Several inventories (INVENTORY_HOSTS), taken in turn.

    One that failed (unreachable, dropped the connection, timed out) is left
    out for DOWN_FOR seconds, then tried again. A request goes on to the next
    only if it never reached the first (unreachable) or is IDEMPOTENT; a
    timeout is answered at once, not waited for twice.
    """

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self._down_until = [0.0] * len(upstreams)
        self._turn = itertools.count()

    def watch(self, probes: list[Upstream], stop: threading.Event) -> None:
        """Check each inventory's /health every CHECK_EVERY seconds (probes: the
        same inventories, with their own connections) until stop is set: one that
        fails or hangs is left out, one that answers again is taken back."""

        def check() -> None:
            while not stop.wait(CHECK_EVERY):
                for i, probe in enumerate(probes):
                    try:
                        up = probe.request("GET", "/health", None, []).status < 500
                    except ApiError:
                        up = False
                    if not up:
                        self._down_until[i] = time.monotonic() + DOWN_FOR
                    elif self._down_until[i]:
                        self._down_until[i] = 0.0
                        log.info("inventory %s:%s is back", probe.host, probe.port)

        if len(probes) > 1:
            threading.Thread(target=check, name="inventory-check", daemon=True).start()

    def request(
        self, method: str, path: str, body: bytes | None, headers: Fields
    ) -> Answer:
        """Send one request to an inventory (Upstream.request), the next if it fails."""
        count, first, now = len(self.upstreams), next(self._turn), time.monotonic()
        turns = [(first + n) % count for n in range(count)]
        turns.sort(key=lambda i: self._down_until[i] > now)  # stable: up ones first
        for tried, i in enumerate(turns, 1):
            upstream = self.upstreams[i]
            try:
                answer = upstream.request(method, path, body, headers)
            except ApiError as exc:
                if exc.status not in (
                    HTTPStatus.BAD_GATEWAY,
                    HTTPStatus.GATEWAY_TIMEOUT,
                ):
                    raise  # busy (503): that inventory is up
                self._down_until[i] = time.monotonic() + DOWN_FOR
                sent = not isinstance(exc, Unreachable)
                if (
                    tried == count
                    or exc.status == HTTPStatus.GATEWAY_TIMEOUT
                    or (sent and method not in IDEMPOTENT)
                ):
                    raise
                log.warning(
                    "inventory %s:%s failed: trying the next",
                    upstream.host,
                    upstream.port,
                )
                continue
            self._down_until[i] = 0.0
            return answer
        raise AssertionError("unreachable")  # the loop returns or raises


class _Relay:
    """A chunked answer's chunks as they come (UpstreamError or OSError mid-way).

    close(), at the end or called early, even before the first chunk, gives
    the connection back: kept if the body was read whole, else closed.
    """

    def __init__(self, upstream: Upstream, conn: _Link, keep: bool) -> None:
        self._upstream, self._conn, self._keep = upstream, conn, keep
        self._chunks = read_chunks(conn.rfile)
        self._open = True

    def __iter__(self) -> _Relay:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self._finish(complete=True)
            raise
        except BaseException:
            self._finish(complete=False)
            raise

    def close(self) -> None:
        """Stop early: the connection is closed."""
        self._finish(complete=False)

    def _finish(self, complete: bool) -> None:
        if self._open:
            self._open = False
            self._upstream._release(self._conn, self._keep and complete)


class _SocketReader(io.RawIOBase):
    """A blocking socket as raw input: SO_RCVTIMEO's EAGAIN becomes TimeoutError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:
            raise TimeoutError("inventory timed out") from None


class _Link:
    """One keep-alive socket to inventory with a buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = io.BufferedReader(_SocketReader(sock))

    def close(self) -> None:
        """Close the reader and the socket."""
        self.rfile.close()
        self.sock.close()


# --- RabbitMQ publisher ---


class _Latch:
    """The outcome one request thread waits for: the part of a Future that
    publish() needs, on one lock (a Future's Condition cost twice the CPU)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # released once settled
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        """True once settled."""
        return self._done

    def set_result(self, result: None) -> None:
        """Settle with success (the ioloop thread, once)."""
        self._settle(None)

    def set_exception(self, error: BaseException) -> None:
        """Settle with error (the ioloop thread, once)."""
        self._settle(error)

    def _settle(self, error: BaseException | None) -> None:
        if self._done:
            raise concurrent.futures.InvalidStateError("settled already")
        self._error, self._done = error, True
        self._lock.release()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait until settled; the error, or None."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise concurrent.futures.TimeoutError
        self._lock.release()  # every later wait returns at once
        return self._error

    def result(self, timeout: float | None = None) -> None:
        """Wait until settled; raise its error, if any."""
        error = self.exception(timeout)
        if error is not None:
            raise error


class _Outgoing:
    """One order on its way to RabbitMQ, and the latch its request waits on."""

    def __init__(
        self,
        future: _Latch | Future[None],
        body: bytes,
        properties: pika.BasicProperties,
        request_id: str = "-",
    ) -> None:
        self.future, self.body, self.properties = future, body, properties
        self.request_id = request_id  # for the log line once RabbitMQ confirms
        self.retried = False  # published again after declaring the queues


class _Confirms:
    """The messages published on the channel and not yet confirmed by RabbitMQ.

    A message that comes back unroutable (the queue was deleted) waits for the
    queues to be declared again and is published once more; if it comes back
    a second time, it fails.
    """

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.channel: Any = None  # the channel to publish on, once the queues exist
        self.waiting: list[_Outgoing] = []  # returned, to publish once more
        self._pending: dict[int, _Outgoing] = {}  # delivery tag -> message
        # Message ids RabbitMQ could not route, counted: two publishes of one
        # Idempotency-Key share a message id.
        self._returned: collections.Counter[str | None] = collections.Counter()
        self._tag = 0

    def restart(self) -> None:
        """A new channel (_Session.on_channel_open): delivery tags start at 1 again."""
        self._tag = 0

    def send(self, outgoing: _Outgoing) -> None:
        """Publish one message (ioloop thread, for Publisher.publish); settle() follows."""
        if self.channel is None:
            outgoing.future.set_exception(ConnectionError("not connected"))
            return
        self._tag += 1
        self._pending[self._tag] = outgoing
        try:
            self.channel.basic_publish(
                "", self.queue, outgoing.body, outgoing.properties, mandatory=True
            )
        except AMQPError as exc:
            self._pending.pop(self._tag, None)
            outgoing.future.set_exception(exc)

    def on_return(
        self, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        """pika: RabbitMQ could not route a message; its ack follows (settle)."""
        self._returned[properties.message_id] += 1

    def settle(self, frame: Any) -> bool:
        """Settle what an ack or nack covers (_Session.on_delivery_confirmation).

        True if a returned message has just started waiting: the queues must
        be declared again, and resend() follows.
        """
        method = frame.method
        if method.multiple:
            tags = [t for t in self._pending if t <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        had_waiting, published = bool(self.waiting), []
        for tag in tags:
            outgoing = self._pending.pop(tag, None)
            if outgoing is None:
                continue
            message_id = outgoing.properties.message_id
            if self._returned[message_id]:
                self._returned -= collections.Counter([message_id])
                if outgoing.retried:
                    _fail(outgoing.future, "message was unroutable")
                else:
                    self.waiting.append(outgoing)
            elif isinstance(method, Basic.Ack):
                outgoing.future.set_result(None)
                published.append(
                    f"order {message_id} published, request {outgoing.request_id}"
                )
            else:
                _fail(outgoing.future, "message was nacked")
        if published:
            # One line per order in one call per ack: a log call from each
            # request thread cost a third of the gateway's CPU per order.
            log.info("\n".join(published))
        return bool(self.waiting) and not had_waiting

    def resend(self) -> None:
        """Publish the returned messages once more (the queues exist again)."""
        waiting, self.waiting = self.waiting, []
        for outgoing in waiting:
            outgoing.retried = True
            self.send(outgoing)

    def fail_all(self, reason: str) -> None:
        """Fail every unconfirmed publish (the caller answers 503)."""
        waiting = [*self._pending.values(), *self.waiting]
        self._pending, self.waiting = {}, []
        self._returned.clear()
        for outgoing in waiting:
            _fail(outgoing.future, reason)


def _fail(future: _Latch | Future[Any], reason: object) -> None:
    """Settle future with ConnectionError(reason), unless it is already settled."""
    if not future.done():
        future.set_exception(ConnectionError(getattr(reason, "reply_text", reason)))


class _BatchingConnection(pika.SelectConnection):
    """A SelectConnection that sends the messages of one batch() in one write.

    pika hands each frame of a message (method, header, body) to its
    transport on its own, and the transport sends each in a system call of
    its own: three per message. Within batch() the frames are held, in
    order, and go to the transport joined when it ends.
    """

    _held: list[bytes] | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the frames sent meanwhile (ioloop thread), then write them at once."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held and self._transport is not None:
                data = b"".join(held)
                self.bytes_sent += len(data)
                self.frames_sent += len(held)
                self._adapter_emit_data(data)

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        """pika: frames to send; held during batch(), else sent as pika does."""
        if self._held is None:
            super()._output_marshaled_frames(marshaled_frames)
        else:
            self._held.extend(marshaled_frames)


class _Session:
    """The publisher's pika steps, from a connection to a channel taking orders.

    on_connection_open -> on_channel_open -> on_confirm_ok -> on_dead_declareok
    -> on_queue_declareok, as in pika's examples. A user that may not declare
    queues (the gateway's on the VMs may only publish) checks that they exist.
    """

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.ready = threading.Event()
        self.problem = "connecting"  # why orders cannot be published now
        self.conn: Any = None  # the connection being served, or None
        self.confirms = _Confirms(queue)
        self._check_only = False  # the broker refused to let us declare queues
        self.blocked = False  # by a resource alarm (on_blocked)
        self.node = ""  # the address of the node connected or being connected to

    def connect(self, params: pika.ConnectionParameters, ioloop: IOLoop) -> None:
        """Start opening a connection (Publisher._serve); on_connection_open follows."""
        self.blocked = False
        self.node = params.host
        self.conn = _BatchingConnection(
            params,
            on_open_callback=self.on_connection_open,
            on_open_error_callback=self.on_connection_open_error,
            on_close_callback=self.on_connection_closed,
            custom_ioloop=ioloop,
        )

    def close(self) -> None:
        """Close the connection (ioloop thread, for Publisher.stop); the loop ends."""
        conn = self.conn
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()  # on_connection_closed or _open_error stops the ioloop

    def on_connection_open(self, conn: Any) -> None:
        """pika: the connection is open; open a channel, on_channel_open follows."""
        conn.add_on_connection_blocked_callback(self.on_blocked)
        conn.add_on_connection_unblocked_callback(self.on_unblocked)
        conn.channel(on_open_callback=self.on_channel_open)

    def on_blocked(self, conn: Any, frame: Any) -> None:
        """pika: a resource alarm (disk, memory) blocks publishing: take no
        orders (503 at once) until on_unblocked; the connection is kept."""
        self.blocked = True
        self.ready.clear()
        self.problem = f"blocked by RabbitMQ: {frame.method.reason}"
        log.warning("RabbitMQ %s", self.problem)

    def on_unblocked(self, conn: Any, frame: Any) -> None:
        """pika: the alarm is over: take orders again, if the channel is ready."""
        log.info("RabbitMQ unblocked publishing")
        self.blocked = False
        if self.confirms.channel is not None:
            self.ready.set()

    def on_connection_open_error(self, conn: Any, error: Exception) -> None:
        """pika: the connection could not be opened; Publisher._run backs off."""
        log.warning("RabbitMQ unreachable: %s", error)
        self.problem = f"unreachable: {error}"
        conn.ioloop.stop()

    def on_connection_closed(self, conn: Any, reason: Exception) -> None:
        """pika: an open connection closed; Publisher._run reconnects."""
        log.warning("RabbitMQ connection closed: %s", reason)
        self.ready.clear()
        self.problem = f"connection closed: {reason}"
        conn.ioloop.stop()

    def on_channel_open(self, channel: Any) -> None:
        """pika: the channel is open; turn on confirms, on_confirm_ok follows."""
        self.confirms.restart()
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.confirms.on_return)
        channel.confirm_delivery(
            self.on_delivery_confirmation,
            callback=functools.partial(self.on_confirm_ok, channel=channel),
        )

    def on_confirm_ok(self, frame: Any, channel: Any) -> None:
        """pika: confirms are on; declare the queues, on_dead_declareok follows."""
        self.declare(channel)

    def declare(self, channel: Any) -> None:
        """Declare the dead-letter queue (durable); on_dead_declareok follows.

        Once the broker has refused a declaration, only check (passively) that
        the queues exist: a missing queue then closes the channel (orders: 503).
        """
        extra = {"passive": True} if self._check_only else {}
        channel.queue_declare(
            f"{self.queue}.dead",
            durable=True,
            **extra,
            callback=functools.partial(self.on_dead_declareok, channel=channel),
        )

    def on_dead_declareok(self, frame: Any, channel: Any) -> None:
        """pika: the dead-letter queue exists; declare the queue, then _declareok."""
        extra: dict[str, Any] = {"arguments": queue_arguments(self.queue)}
        if self._check_only:
            extra = {"passive": True}
        channel.queue_declare(
            self.queue,
            durable=True,
            **extra,
            callback=functools.partial(self.on_queue_declareok, channel=channel),
        )

    def on_queue_declareok(self, frame: Any, channel: Any) -> None:
        """pika: both queues exist: take orders, send the returned ones once more."""
        self.confirms.channel = channel
        if not self.ready.is_set() and not self.blocked:
            self.ready.set()
            log.info("publishing to queue %s", self.queue)
        self.confirms.resend()

    def on_delivery_confirmation(self, frame: Any) -> None:
        """pika: RabbitMQ acked or nacked; declare again if a message came back."""
        if self.confirms.settle(frame) and self.confirms.channel is not None:
            log.warning("queue %s is gone: declaring it again", self.queue)
            self.declare(self.confirms.channel)

    def on_channel_closed(self, channel: Any, reason: Exception) -> None:
        """pika: the channel closed: reconnect, or if refused a declaration, check."""
        self.ready.clear()
        self.problem = f"channel closed: {reason}"
        self.confirms.channel = None
        self.confirms.fail_all("channel closed")
        refused = getattr(reason, "reply_code", None) == ACCESS_REFUSED
        conn = self.conn
        if refused and not self._check_only and conn is not None and conn.is_open:
            # A new channel at once (on_channel_open), which only checks.
            log.info("may not declare queue %s: checking that it exists", self.queue)
            self._check_only = True
            conn.channel(on_open_callback=self.on_channel_open)
            return
        log.warning("RabbitMQ channel closed: %s", reason)
        if conn is not None and conn.is_open:
            conn.close()


class _QueueProbe:
    """Reads the queue's consumers and ready messages for /health.

    At most once per QUEUE_STATE_AGE, whoever asks: callers meanwhile get the
    last reading, so /health cannot be used to hammer RabbitMQ. It reads on a
    channel of its own: if the queue is gone, RabbitMQ closes that one, not
    the channel orders are published on.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._state: tuple[int, int] | str = "not read yet"
        self._time = -QUEUE_STATE_AGE
        self._lock = threading.Lock()

    def state(self) -> tuple[int, int] | str:
        """(consumers, ready messages), or why unknown (Publisher.queue_state)."""
        with self._lock:
            conn = self._session.conn
            if conn is None or not self._session.ready.is_set():
                return "RabbitMQ not connected"  # asks RabbitMQ nothing: not kept
            if time.monotonic() - self._time >= QUEUE_STATE_AGE:
                self._state = self._read(conn)
                self._time = time.monotonic()
            return self._state

    def _read(self, conn: Any) -> tuple[int, int] | str:
        """Have the ioloop thread run open_channel; wait QUEUE_STATE_WAIT at most."""
        future: Future[tuple[int, int]] = Future()
        try:
            conn.ioloop.add_callback_threadsafe(
                functools.partial(self.open_channel, future)
            )
            return future.result(timeout=QUEUE_STATE_WAIT)
        except concurrent.futures.TimeoutError:
            return NO_ANSWER
        except (OSError, AMQPError) as exc:
            return str(exc)

    def open_channel(self, future: Future[tuple[int, int]]) -> None:
        """Open the probe's channel (ioloop thread); on_channel_open follows."""
        conn = self._session.conn
        if conn is None or not conn.is_open:
            _fail(future, "RabbitMQ not connected")
            return
        conn.channel(
            on_open_callback=functools.partial(self.on_channel_open, future=future)
        )

    def on_channel_open(self, channel: Any, future: Future[tuple[int, int]]) -> None:
        """pika: the probe's channel is open; declare passively, on_declareok next."""
        channel.add_on_close_callback(
            functools.partial(self.on_channel_closed, future=future)
        )
        channel.queue_declare(
            self._session.queue,
            passive=True,
            callback=functools.partial(
                self.on_declareok, channel=channel, future=future
            ),
        )

    def on_declareok(
        self, frame: Any, channel: Any, future: Future[tuple[int, int]]
    ) -> None:
        """pika: RabbitMQ told the queue's figures; close the channel, _closed next."""
        if not future.done():
            future.set_result((frame.method.consumer_count, frame.method.message_count))
        channel.close()

    def on_channel_closed(
        self, channel: Any, reason: Exception, future: Future[tuple[int, int]]
    ) -> None:
        """pika: the probe's channel closed; fail the future, if not yet settled."""
        _fail(future, reason)


# The publisher's threads and locks. The publisher thread (Publisher._run)
# owns the connection and its ioloop, and alone touches _Session and
# _Confirms. A request thread (Publisher.publish) hands its order to the
# _Outbox under the outbox's lock, together with the live connection, then
# wakes that ioloop (once per batch); _send_outbox empties the outbox in the
# ioloop. Publisher._lock guards _ioloop between _serve and stop(). When a
# connection ends, Publisher._reset fails every unconfirmed and unsent order
# (503) and the outbox's pending wake-up, under the outbox's lock, so no order
# ever waits for a wake-up that will not come.


class _Outbox:
    """Orders handed over and not yet published: one ioloop wake-up takes all
    that came meanwhile (a wake-up per order cost a system call and a thread
    switch each). Its lock orders a reconnect's clearing before or after an
    order's hand-over, never in between."""

    def __init__(self) -> None:
        self.items: list[_Outgoing] = []
        self.woken = False  # a wake-up is on its way to the ioloop
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, outgoing: _Outgoing, live: Callable[[], Any]) -> tuple[Any, bool]:
        """Hand outgoing over on the connection live() reads under the lock;
        return (that connection, whether to wake its ioloop), or (None, False)
        with nothing handed over if live() says there is none."""
        with self._lock:
            conn = live()
            if conn is None:
                return None, False
            self.items.append(outgoing)
            wake, self.woken = not self.woken, True
            return conn, wake

    def take(self) -> list[_Outgoing]:
        """Every order handed over; the next one wakes the ioloop anew."""
        with self._lock:
            items, self.items, self.woken = self.items, [], False
        return items

    def clear(self, reason: str) -> None:
        """Fail what a lost ioloop will never publish."""
        for outgoing in self.take():
            _fail(outgoing.future, reason)


class Publisher:
    """Owns the RabbitMQ connection in one thread; others hand it messages.

    Messages are published with `mandatory` on a confirming channel, and the
    caller waits for RabbitMQ's ack: only then is an order safe. _Session
    holds the pika steps, _Confirms the unconfirmed messages, _QueueProbe
    the queue's reading for /health; the block above says who holds what.
    """

    def __init__(
        self,
        params: pika.ConnectionParameters | list[pika.ConnectionParameters],
        queue: str,
    ) -> None:
        self.nodes, self.queue = Nodes(params), queue
        self._session = _Session(queue)
        self.ready = self._session.ready
        self._probe = _QueueProbe(self._session)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ioloop: IOLoop | None = None
        self._lock = threading.Lock()  # guards _ioloop between _serve and stop()
        self._outbox = _Outbox()

    def start(self) -> None:
        """Connect in a background thread (_run), reconnecting until stop()."""
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the connection and end the thread (main() calls it at exit)."""
        self._stop.set()
        with self._lock:
            if self._ioloop is not None:
                self._ioloop.add_callback_threadsafe(self._session.close)
        if self._thread is not None:
            self._thread.join(5)

    def status(self) -> str | None:
        """None while orders can be published, else why not (for /health)."""
        if self._thread is None or not self._thread.is_alive():
            return "publisher not running"
        return None if self.ready.is_set() else self._session.problem

    def node(self) -> str | None:
        """The address of the RabbitMQ node orders go to, or None if none."""
        return self._session.node if self.ready.is_set() else None

    def queue_state(self) -> tuple[int, int] | str:
        """(consumers, ready messages) of the queue, or why it cannot be read."""
        return self._probe.state()

    def publish(self, body: bytes, message_id: str, request_id: str = "-") -> None:
        """Publish body, wait for the confirm (_Confirms.settle logs it); else 503."""
        future = _Latch()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            timestamp=int(time.time()),
        )
        outgoing = _Outgoing(future, body, properties, request_id)
        conn, wake = self._outbox.add(outgoing, self._live)  # see the block above
        if conn is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "message broker unavailable")
        try:
            if wake:
                conn.ioloop.add_callback_threadsafe(self._send_outbox)
            future.result(timeout=PUBLISH_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "message broker did not confirm in time"
            ) from None
        except (ConnectionError, AMQPError) as exc:
            log.warning("publish failed: %s", exc)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "message broker did not take the order"
            ) from None

    def _live(self) -> Any:
        """The connection orders can be published on, or None."""
        return self._session.conn if self.ready.is_set() else None

    def _send_outbox(self) -> None:
        """Publish every order handed over since the last wake-up (ioloop thread)."""
        outbox = self._outbox.take()
        with self._session.conn.batch():  # one write for all (the ioloop's conn)
            for outgoing in outbox:
                self._session.confirms.send(outgoing)

    def _reset(self, reason: str) -> None:
        """A connection ended (_run): not ready; fail every order in flight."""
        self.ready.clear()
        self._session.confirms.channel = None
        self._session.confirms.fail_all(reason)
        self._outbox.clear(reason)

    def _run(self) -> None:
        """The thread (start): _serve a connection, back off, repeat until stop().

        Nothing else ends it: an error while connecting (out of file
        descriptors, say) is logged and retried like a refused connection.
        """
        backoff = Backoff()
        while not self._stop.is_set():
            backoff.start()
            try:
                self._serve()
            except Exception as exc:
                log.exception("publisher failed")
                self._session.problem = f"publisher failed: {exc}"
            self._reset("connection lost")
            self._stop.wait(backoff.failed())

    def _serve(self) -> None:
        """Open one connection (_Session.connect) and run its ioloop until it ends."""
        with self._lock:  # stop() comes before this or finds the ioloop open
            if self._stop.is_set():
                return
            ioloop = self._ioloop = IOLoop()
        self._outbox.clear("connection lost")  # handed to the last ioloop, late
        try:
            self._session.connect(self.nodes.take(), ioloop)
            ioloop.start()
        finally:
            with self._lock:
                self._ioloop = self._session.conn = None
                ioloop.close()  # its epoll and wake-up sockets, else leaked each time


# --- Handlers ---


def proxy_movies(req: Request, upstream: Upstreams) -> Response:
    """Any /api/movies... request: forward to inventory, answer as it did."""
    body = None
    if req.method in ("POST", "PUT") or req.length:
        body = req.read_body(MAX_PROXY_BODY)
    # Every line, in order: two lines of one name are not the last one's alone.
    named = "connection" in req.headers  # rare: most requests send none
    drop = hop_by_hop(req.headers.items(), HOP_BY_HOP) if named else HOP_BY_HOP
    headers = [(k, v) for k, v in req.headers.items() if k.lower() not in drop]
    headers += [("X-Forwarded-For", req.client[0]), ("X-Request-Id", req.request_id)]
    status, upstream_headers, data = upstream.request(
        req.method, req.target, body, headers
    )
    drop = hop_by_hop(upstream_headers, DROP_FROM_UPSTREAM)
    kept = {k: v for k, v in upstream_headers if k.lower() not in drop}
    if not any(k.lower() == "content-type" for k in kept):
        kept["Content-Type"] = JSON
    return Response(status, data, kept)


def hop_by_hop(fields: Fields, always: set[str]) -> set[str]:
    """Lower-case names not to pass on: always, and those a Connection line
    names (RFC 9110, 7.6.1: they concern this hop only)."""
    named = {
        name.strip().lower()
        for key, value in fields
        if key.lower() == "connection"
        for name in value.split(",")
    }
    return always | named


def post_billing(req: Request, publisher: Publisher) -> Response:
    """POST /api/billing: validate the order and publish it with a confirm."""
    body = req.read_body(MAX_ORDER_BODY, json_only=True)
    order = validate_order(decode_object(body, "request body", _decimal))
    key = idempotency_key(req.headers)
    # billing stores each message_id once: a retry of the same order with the
    # same key is a no-op, even if the first attempt's answer was lost.
    message_id = new_id(128) if key is None else keyed_message_id(order, key)
    publisher.publish(body, message_id, req.request_id)
    return json_response(
        HTTPStatus.OK, {"message": "Message posted"}, {"X-Message-Id": message_id}
    )


def health(
    req: Request | None, probes: list[Upstream], publisher: Publisher
) -> Response:
    """GET /health: 503 if orders or every inventory fail; 200 "degraded" if
    billing does or one inventory of several."""
    report: dict[str, object] = {"status": "ok", "inventory": "ok", "rabbitmq": "ok"}
    report["billing"] = "ok"
    inventories = {}
    for probe in probes:
        try:
            status, _, _ = probe.request("GET", "/health", None, [])
            verdict = "ok" if status < 500 else f"answers {status}"
        except ApiError as exc:
            verdict = exc.message
        inventories[f"{probe.host}:{probe.port}"] = verdict
    report["inventories"] = inventories
    if "ok" not in inventories.values():
        report["inventory"] = next(iter(inventories.values()))
    problem = publisher.status()
    state = publisher.queue_state()
    if problem is None and state == NO_ANSWER:
        problem = NO_ANSWER  # connected, but hung or cut off: orders would wait
    if problem is not None:
        report["rabbitmq"] = problem
    node = publisher.node()
    if node:
        report["rabbitmq_node"] = node
    if isinstance(state, str):
        report["billing"] = f"unknown: {state}"
    else:
        consumers, ready = state
        queue = {"name": publisher.queue, "consumers": consumers, "ready": ready}
        report["queue"] = queue
        if not consumers:
            report["billing"] = "not consuming: no consumer on the queue"
    if report["inventory"] != "ok" or report["rabbitmq"] != "ok":
        report["status"] = "degraded"
        return json_response(HTTPStatus.SERVICE_UNAVAILABLE, report)
    if report["billing"] != "ok" or len(set(inventories.values())) > 1:
        report["status"] = "degraded"  # orders are still taken and kept
    return json_response(HTTPStatus.OK, report)


def get_spec(req: Request) -> Response:
    """GET /openapi.yaml: the committed API description."""
    return Response(
        HTTPStatus.OK, SPEC_FILE.read_bytes(), {"Content-Type": "application/yaml"}
    )


def get_docs(req: Request) -> Response:
    """GET /docs: a page that renders the API description with Swagger UI."""
    html = {"Content-Type": "text/html; charset=utf-8"}
    return Response(HTTPStatus.OK, DOCS_PAGE.encode(), html)


def get_docs_asset(req: Request, name: str) -> Response:
    """GET /docs/<file>: Swagger UI's files, installed from npm by the setup."""
    path = DOCS_ASSETS / name
    if name not in DOCS_FILES:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {clip(name)}")
    if not path.is_file():
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name} (run npm ci)")
    kinds = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
    ctype = kinds.get(path.suffix, "application/octet-stream")
    return Response(HTTPStatus.OK, path.read_bytes(), {"Content-Type": ctype})


def build_routes(
    upstream: Upstreams, publisher: Publisher, probes: list[Upstream]
) -> Router:
    """The route table, each handler given what it needs (probes: /health's
    connections to each inventory)."""
    proxy = functools.partial(proxy_movies, upstream=upstream)
    order = functools.partial(post_billing, publisher=publisher)
    check = functools.partial(health, probes=probes, publisher=publisher)
    return Router(
        [
            ("*", r"/api/movies(/.*)?", proxy),
            ("POST", r"/api/billing/?", order),
            ("GET", r"/health/?", check),
            ("GET", r"/openapi\.yaml", get_spec),
            ("GET", r"/docs/?", get_docs),
            ("GET", r"/docs/(?P<name>[^/]+)", get_docs_asset),
        ]
    )


# --- HTTP ---


# --- shared: http (identical in gateway.py, inventory.py) ---
# The HTTP/1.1 core of both servers: a strict head reader, the request and
# response values, routing, one response writer, and the threading server.

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (methods)
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_NON_ASCII = re.compile(r"[\x80-\xff]")  # raw bytes of the target, read as latin-1
_VERSION = re.compile(r"HTTP/([0-9])\.[0-9]")
# name ":" value: a token for the name, no space before the colon, no control
# character but HTAB in the value (so no bare CR, no NUL; no obs-fold either)
_HEADER_LINE = re.compile(f"({_TOKEN.pattern}):" + r"([^\x00-\x08\x0a-\x1f\x7f]*)")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a sent id we keep
# Ids come from os.urandom 4 KiB at a time: a call per id is a system call
# that lets go of the GIL, under load one more hand-over between threads.
_ID_BYTES = bytearray()  # drawn and not yet used, under _ID_LOCK
_ID_LOCK = threading.Lock()
MAX_HEADERS = 100  # header lines in a request (http.client's limit)
CONNECTIONS_PER_CLIENT = 64  # default of the setting MAX_CONNECTIONS_PER_CLIENT
CAP_WARNING_EVERY = 10.0  # seconds between two warnings about the caps
WRITE_TIMEOUT = REQUEST_TIMEOUT + 5  # seconds one send may wait for a slow reader
TIMEOUT_SLACK = 0.05  # seconds a read may outlast the request's deadline
# A body refused unread is read and dropped, up to this much for this long,
# before closing: a close with data unread sends a reset, and a client still
# sending would lose the answer (nginx's lingering close does the same).
DISCARD_BYTES = 16 * 1024 * 1024
DISCARD_SECONDS = 2.0
JSON = "application/json"
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


class ApiError(Exception):
    """An error answered to the client as {"error": message}, with its headers."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = headers or {}


class Response(NamedTuple):
    """A handler's answer: a body of bytes, or of pieces streamed as they come."""

    status: int
    body: bytes | Iterator[bytes]
    headers: dict[str, str]


def json_response(
    status: int, data: object, headers: dict[str, str] | None = None
) -> Response:
    """A response whose body is data written as JSON."""
    return Response(
        status, json.dumps(data).encode(), {"Content-Type": JSON, **(headers or {})}
    )


class Deadline:
    """A moment by which a request must have arrived; each read waits what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; TimeoutError once there are none."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        return left


class Connection:
    """A client's socket with a read buffer; reads stop at the request's deadline.

    The socket stays blocking and the kernel keeps its timeouts (SO_RCVTIMEO,
    SO_SNDTIMEO): a Python timeout would cost a poll() before every recv and
    send, and an ioctl() at every change, three system calls for one.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()
        self.deadline = Deadline(REQUEST_TIMEOUT)
        sock.settimeout(None)
        self._wait = _set_timeout(sock, socket.SO_RCVTIMEO, REQUEST_TIMEOUT)
        _set_timeout(sock, socket.SO_SNDTIMEO, WRITE_TIMEOUT)

    def fill(self) -> bool:
        """Add what the client sent next to the buffer; False at its end."""
        while True:
            left = self.deadline.left()  # TimeoutError once it has passed
            if abs(left - self._wait) > TIMEOUT_SLACK:  # not on a fresh request
                self._wait = _set_timeout(self.sock, socket.SO_RCVTIMEO, left)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:  # the kernel's timeout: check the deadline
                continue
            self.buffer += data
            return bool(data)

    def read_exact(self, size: int) -> bytes:
        """size bytes, or fewer if the client stops or the deadline passes."""
        with contextlib.suppress(OSError):  # TimeoutError and resets alike
            while len(self.buffer) < size and self.fill():
                pass
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def discard(self, size: int) -> None:
        """Read and drop up to size bytes (see DISCARD_BYTES), then stop."""
        self.deadline = Deadline(DISCARD_SECONDS)
        left = min(size, DISCARD_BYTES) - len(self.buffer)
        self.buffer.clear()
        with contextlib.suppress(OSError):  # TimeoutError and resets alike
            while left > 0 and self.fill():
                left -= len(self.buffer)
                self.buffer.clear()

    def send(self, *parts: bytes) -> None:
        """Send all of parts, in one system call while the socket takes them
        (no copy joins a head and its body); a reader stalled for
        WRITE_TIMEOUT raises."""
        views = [memoryview(part) for part in parts if part]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if views:
                    views[0] = views[0][sent:]
        except BlockingIOError:
            raise TimeoutError("client stopped reading") from None


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> float:
    """Set the kernel's timeout for recv (SO_RCVTIMEO) or send; return it."""
    seconds = max(seconds, 0.001)  # 0 would mean no timeout at all
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET,
        option,
        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)),
    )
    return seconds


class Headers:
    """A request's header fields, found by name case-insensitively."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of the field name, or default."""
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of the field name, in the order sent."""
        return self._values.get(name.lower(), [])

    def items(self) -> list[tuple[str, str]]:
        """(name, value) of every field, in the order sent."""
        return self.pairs

    def __contains__(self, name: str) -> bool:
        """Whether the field name was sent."""
        return name.lower() in self._values


class Head(NamedTuple):
    """A request's head, parsed."""

    method: str
    target: str
    version: str
    headers: Headers


class Request:
    """One request as handlers see it; read_body() reads its body when wanted."""

    def __init__(
        self,
        head: Head,
        client: tuple[str, int],
        conn: Connection,
    ) -> None:
        self.method, self.target, self.version, self.headers = head
        try:
            self.path = urlsplit(self.target).path
        except ValueError:  # an absolute URL whose host is not one: http://[::1/
            raise ApiError(HTTPStatus.BAD_REQUEST, "malformed URL") from None
        self.client, self.request_id = client, request_id(self.headers)
        self.length, self.keep_alive, self.expect_100 = read_framing(
            self.headers, self.version
        )
        hosts = len(self.headers.get_all("Host"))
        if hosts > 1 or (hosts == 0 and self.version != "HTTP/1.0"):
            # RFC 9112 3.2: which host is meant is then anyone's guess.
            raise ApiError(HTTPStatus.BAD_REQUEST, "send one Host header")
        self.body_read = False
        self._conn = conn

    @functools.cached_property
    def query(self) -> dict[str, str]:
        """The query string as {name: last value}; 400 unless it is UTF-8."""
        try:
            pairs = parse_qs(
                urlsplit(self.target).query, keep_blank_values=True, errors="strict"
            )
        except (ValueError, UnicodeDecodeError):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "query string is not valid UTF-8"
            ) from None
        for name, values in pairs.items():
            if len(set(values)) > 1:  # which one was meant? none is guessed
                raise ApiError(HTTPStatus.BAD_REQUEST, f"send '{clip(name)}' once")
        return {name: values[0] for name, values in pairs.items()}

    def read_body(self, limit: int, json_only: bool = False) -> bytes:
        """The body: 415 if not JSON (when asked), 413 over limit, 408 if cut short."""
        if json_only:
            media = self.headers.get("Content-Type") or ""  # none: not JSON
            media = media.split(";")[0].strip().lower()
            if media != JSON and not media.endswith("+json"):
                raise ApiError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {JSON}"
                )
        if self.length > limit:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes"
            )
        if self.expect_100 and self.length:
            self.expect_100 = False  # only now: the body is wanted
            self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._conn.read_exact(self.length)
        self.body_read = True
        if len(body) < self.length:
            self.keep_alive = False
            raise ApiError(
                HTTPStatus.REQUEST_TIMEOUT, "request body not received in time"
            )
        return body


def clip(text: str, size: int = 80) -> str:
    """text for an error message: at most size characters of what was sent."""
    return text if len(text) <= size else text[:size] + "..."


def request_id(headers: Headers) -> str:
    """The X-Request-Id sent if it is one sane value, else a new id."""
    sent = headers.get_all("X-Request-Id")
    if len(sent) == 1 and _REQUEST_ID.fullmatch(sent[0]):
        return sent[0]
    return new_id()


def new_id(bits: int = 64) -> str:
    """A random id of bits / 4 hex digits (see _ID_BYTES)."""
    size = bits // 8
    with _ID_LOCK:
        if len(_ID_BYTES) < size:
            _ID_BYTES[:] = os.urandom(4096)
        data = _ID_BYTES[:size]
        del _ID_BYTES[:size]
    return data.hex()


def read_request_head(conn: Connection) -> bytes | None:
    """The next request line and headers, or None if the client sent none.

    408 if the deadline passes mid-head, 400 if the client ends it early,
    414 or 431 beyond MAX_HEAD bytes.
    """
    buffer, start = conn.buffer, 0
    while True:
        while buffer.startswith(b"\n") or buffer.startswith(b"\r\n"):
            del buffer[: buffer.index(b"\n") + 1]  # RFC 9112 2.2: blank lines before
            start = 0
        end = head_end(buffer, start)
        if end > MAX_HEAD or (not end and len(buffer) > MAX_HEAD):
            if b"\n" not in buffer[:MAX_HEAD]:
                raise ApiError(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
            raise ApiError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request line and headers over {MAX_HEAD} bytes",
            )
        if end:
            head = bytes(buffer[:end])
            del buffer[:end]
            return head
        start = max(len(buffer) - 2, 0)
        try:
            more = conn.fill()
        except TimeoutError:
            if not buffer:
                return None  # an idle connection: closed without a word
            raise ApiError(
                HTTPStatus.REQUEST_TIMEOUT, "request not received in time"
            ) from None
        if not more:
            if not buffer:
                return None
            raise ApiError(HTTPStatus.BAD_REQUEST, "request cut off")


def head_end(buffer: bytearray | bytes, start: int = 0) -> int:
    """Where the head ends in buffer (after its blank line), or 0 if not yet."""
    crlf = buffer.find(b"\n\r\n", start)
    lf = buffer.find(b"\n\n", start, len(buffer) if crlf < 0 else crlf + 1)
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else 0


def parse_head(head: bytes) -> Head:
    """Split a head into (method, target, version, headers); ApiError if malformed."""
    lines = head.decode("latin-1").split("\n")[:-2]  # the blank line's two ends
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    method, target, version = parse_request_line(lines[0])
    if len(lines) > MAX_HEADERS + 1:
        raise ApiError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"over {MAX_HEADERS} header lines",
        )
    pairs = []
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "malformed header line")
        pairs.append((match[1], match[2].strip(" \t")))
    return Head(method, target, version, Headers(pairs))


def parse_request_line(line: str) -> tuple[str, str, str]:
    """(method, target, version) of a request line; ApiError unless HTTP/1.x."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise ApiError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"malformed HTTP version {version[:20]!r}"
        )
    if match[1] != "1":
        raise ApiError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "speak HTTP/1.1")
    if not _TOKEN.fullmatch(method):
        raise ApiError(HTTPStatus.BAD_REQUEST, "invalid method")
    if _CONTROL.search(target):
        raise ApiError(HTTPStatus.BAD_REQUEST, "control character in the URL")
    if target.startswith("//"):
        target = "/" + target.lstrip("/")  # not a host: http.server's reading
    return method, _NON_ASCII.sub(_percent_encode, target), version


def _percent_encode(match: re.Match[str]) -> str:
    """Percent-encode one raw byte of the request target."""
    return f"%{ord(match.group()):02X}"


def read_framing(headers: Headers, version: str) -> tuple[int, bool, bool]:
    """(body length, keep-alive, expects 100) of a request; refuse other framing."""
    lengths = headers.get_all("Content-Length")
    if "Transfer-Encoding" in headers:
        if lengths:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "send Content-Length or Transfer-Encoding, not both",
            )
        raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
    length = 0
    if lengths:
        # RFC 9112 6.3: identical repeated values stand for that one value.
        values = {v.strip(" \t") for line in lengths for v in line.split(",")}
        text = values.pop()
        if values or not text.isascii() or not text.isdigit() or len(text) > 18:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "Content-Length must be one non-negative integer",
            )
        length = int(text)
    options = {
        v.strip(" \t").lower()
        for line in headers.get_all("Connection")
        for v in line.split(",")
    }
    http11 = version >= "HTTP/1.1"
    keep_alive = "close" not in options and (http11 or "keep-alive" in options)
    expect_100 = http11 and (headers.get("Expect") or "").lower() == "100-continue"
    return length, keep_alive, expect_100


Route = tuple[str, str, Callable[..., Response]]


class Router:
    """A route table: (method or "*", path pattern, handler), first match wins."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = [
            (method, re.compile(path), handler) for method, path, handler in routes
        ]

    def match(
        self, method: str, path: str
    ) -> tuple[Callable[..., Response], dict[str, str]]:
        """The handler for method and path with the path's named groups; 404 or 405."""
        allowed = []
        for route_method, pattern, handler in self.routes:
            found = pattern.fullmatch(path)
            if found:
                if route_method in ("*", method):
                    return handler, found.groupdict()
                allowed.append(route_method)
        if not allowed:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {clip(path)}")
        raise ApiError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"{clip(method)} not allowed",
            {"Allow": ", ".join(allowed)},
        )


def dispatch(router: Router, req: Request) -> Response:
    """Run the request's handler; any error becomes a JSON answer (500: logged)."""
    try:
        handler, params = router.match(req.method, req.path)
        return handler(req, **params)
    except ApiError as exc:
        return json_response(exc.status, {"error": exc.message}, exc.headers)
    except Exception:
        log.exception("%s %s failed", req.method, req.target)
        return json_response(
            HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        )


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    """The Date header's value for a second since the epoch."""
    return email.utils.formatdate(second, usegmt=True)


def response_head(response: Response, request_id: str, framing: str) -> bytes:
    """The status line and headers, framing ones last (Content-Length, ...)."""
    status = int(response.status)
    lines = [
        f"HTTP/1.1 {status} {_PHRASES.get(status, '')}",
        f"Server: {SERVER_VERSION}",
        f"Date: {_http_date(int(time.time()))}",
        f"X-Request-Id: {request_id}",
        *(f"{name}: {value}" for name, value in response.headers.items()),
        framing,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def write_response(
    conn: Connection,
    response: Response,
    request_id: str,
    keep_alive: bool,
    method: str = "GET",
    version: str = "HTTP/1.1",
) -> bool:
    """Send response; True if the connection may carry another request.

    A body of bytes goes with its Content-Length in one write; pieces go
    chunked, or to an HTTP/1.0 client until the connection closes.
    """
    body, close = response.body, "" if keep_alive else "\r\nConnection: close"
    if isinstance(body, bytes):
        head = response_head(
            response, request_id, f"Content-Length: {len(body)}{close}"
        )
        conn.send(head, b"" if method == "HEAD" else body)
        return keep_alive
    chunked = version >= "HTTP/1.1"
    if not chunked:
        keep_alive, close = False, "\r\nConnection: close"
    framing = ("Transfer-Encoding: chunked" if chunked else "") + close
    head = response_head(response, request_id, framing.removeprefix("\r\n"))
    return _stream(conn, head, body, chunked, method == "HEAD") and keep_alive


def _stream(
    conn: Connection,
    head: bytes,
    pieces: Iterator[bytes],
    chunked: bool,
    head_only: bool,
) -> bool:
    """Send head, then the pieces as they come; False if they stopped short."""
    try:
        conn.send(head)
        for piece in () if head_only else pieces:
            if piece:  # an empty chunk would end the body
                if chunked:
                    conn.send(b"%x\r\n" % len(piece), piece, b"\r\n")
                else:
                    conn.send(piece)
        if chunked and not head_only:
            conn.send(b"0\r\n\r\n")
        return True
    except Exception as exc:
        # Too late for an error status: cut the connection so the client
        # sees a truncated body rather than a complete-looking one.
        log.warning("streaming stopped: %s", exc)
        return False
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a generator's cleanup (pooled connections) runs now


class Handler(StreamRequestHandler):
    """Serves one connection: reads its requests one by one and answers each."""

    disable_nagle_algorithm = True  # headers and body of pieces go out at once
    server: Server

    def handle(self) -> None:
        """Answer requests until one ends the connection."""
        conn = Connection(self.connection)
        while self.handle_one(conn):
            self.server.rest(self.connection)  # kept alive: idle until the next

    def handle_one(self, conn: Connection) -> bool:
        """Read one request within REQUEST_TIMEOUT and answer it; False to close."""
        conn.deadline, started = Deadline(REQUEST_TIMEOUT), time.monotonic()
        try:
            head = read_request_head(conn)
            if head is None or not self.server.wake(self.connection):
                return False
            req = Request(parse_head(head), self.client_address, conn)
        except ApiError as exc:
            response = json_response(exc.status, {"error": exc.message}, exc.headers)
            rid = new_id()
            write_response(conn, response, rid, keep_alive=False)
            _log_access("-", "-", response.status, started, rid)
            return False
        self.server.busy.add(conn)
        try:
            response = dispatch(self.server.router, req)
            if req.length and not req.body_read:
                req.keep_alive = False  # the unread body would poison the stream
            keep_alive = req.keep_alive and not self.server.stopping
            keep_alive = write_response(
                conn, response, req.request_id, keep_alive, req.method, req.version
            )
        finally:
            self.server.busy.discard(conn)
        if req.length and not req.body_read:
            conn.discard(req.length)
        _log_access(req.method, req.target, response.status, started, req.request_id)
        return keep_alive


def _log_access(
    method: str, target: str, status: int, started: float, rid: str
) -> None:
    """Write the access line (at ACCESS_LEVEL): method, target, status, time, id."""
    if log.isEnabledFor(ACCESS_LEVEL):
        took = (time.monotonic() - started) * 1000
        target = _CONTROL.sub("?", target)
        log.log(
            ACCESS_LEVEL, "%s %s %s %.1fms %s", method, target, int(status), took, rid
        )


def _refuse(sock: socket.socket, status: HTTPStatus, message: str) -> None:
    """Answer a connection the server has no room for, without waiting."""
    body = json.dumps({"error": message}).encode()
    response = Response(status, body, {"Content-Type": JSON, "Retry-After": "1"})
    framing = f"Content-Length: {len(body)}\r\nConnection: close"
    sock.setblocking(False)  # the serve loop is one thread: never block it
    with contextlib.suppress(OSError):
        sock.send(response_head(response, new_id(), framing) + body)


class Server(ThreadingHTTPServer):
    """A threading server with connection caps and a graceful stop.

    At most MAX_CONNECTIONS open connections, and per_client from one
    address. A connection kept alive between requests is idle: when a new one
    finds no room, the oldest idle one (of that address, at its cap) is closed
    to make it, so idle connections never shut a client out.
    """

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], router: Router) -> None:
        super().__init__(address, Handler)
        self.router = router
        self.per_client = CONNECTIONS_PER_CLIENT
        self.clients: dict[Any, str] = {}  # open connection: its peer's address
        self.counts: collections.Counter[str] = collections.Counter()
        self.idle: dict[Any, None] = {}  # kept alive, oldest first
        self.busy: set[Connection] = set()  # connections with a request in progress
        self.stopping = False
        self._lock = threading.Lock()  # clients, counts, idle
        self._warned = 0.0  # when the last warning about a cap was logged

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take the connection, closing an idle one if need be to make room;
        else answer 429 (its address is at its cap) or 503 (the server is)."""
        peer = str(client_address[0]) if client_address else "-"
        with self._lock:
            full = None
            if self.counts[peer] >= self.per_client:
                full = f"{peer} has {self.per_client} connections, its cap"
                status, message = HTTPStatus.TOO_MANY_REQUESTS, "too many connections"
                taken = self._reclaim(peer)
            elif len(self.clients) >= MAX_CONNECTIONS:
                full = f"{MAX_CONNECTIONS} connections open, the server's cap"
                status, message = HTTPStatus.SERVICE_UNAVAILABLE, "server busy"
                taken = self._reclaim(None)
            else:
                taken = True
            if taken:
                self.clients[request] = peer
                self.counts[peer] += 1
        if full is not None:
            done = "closed an idle one" if taken else f"refused one from {peer}"
            self._warn(f"{full}: {done}")
        if not taken:
            _refuse(request, status, f"{message}, try again")
        return taken

    def _reclaim(self, peer: str | None) -> bool:
        """Close the oldest idle connection (of peer, if given); False if none.
        Its thread reads the end of the stream and finishes."""
        for sock in self.idle:
            if peer is None or self.clients[sock] == peer:
                self._forget(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return True
        return False

    def _forget(self, sock: Any) -> None:
        """Free sock's places (under the lock)."""
        peer = self.clients.pop(sock, None)
        self.idle.pop(sock, None)
        if peer is not None:
            self.counts[peer] -= 1
            if not self.counts[peer]:
                del self.counts[peer]

    def _warn(self, message: str) -> None:
        """Log a warning about the caps, at most one every CAP_WARNING_EVERY s."""
        now = time.monotonic()
        if now - self._warned >= CAP_WARNING_EVERY:
            self._warned = now
            log.warning("%s", message)

    def rest(self, sock: Any) -> None:
        """sock is kept alive and waits for its next request: it may be closed."""
        with self._lock:
            if sock in self.clients:
                self.idle[sock] = None

    def wake(self, sock: Any) -> bool:
        """A request came on sock: it is no longer idle; False if it was closed."""
        with self._lock:
            self.idle.pop(sock, None)
            return sock in self.clients

    def shutdown_request(self, request: Any) -> None:
        """Close a connection and free its place."""
        with self._lock:
            self._forget(request)
        super().shutdown_request(request)

    def serve_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then finish requests in flight and close."""
        stopping = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            if not stopping.is_set():
                stopping.set()
                threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.serve_forever()
        self.finish(SHUTDOWN_GRACE)
        self.server_close()

    def stop(self) -> None:
        """Refuse new connections at once, then end serve_forever (another thread)."""
        self.stopping = True
        with contextlib.suppress(OSError):  # Linux refuses connects from now on
            self.socket.shutdown(socket.SHUT_RDWR)
        self.shutdown()

    def finish(self, grace: float) -> None:
        """Once serve_forever returned, wait up to grace seconds for requests."""
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy:
            log.warning("stopping with %d requests unfinished", len(self.busy))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log unexpected errors; ordinary disconnects are a debug line."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)


def decode_object(
    body: bytes, what: str, parse_float: Callable[[str], Any] = float
) -> dict[str, Any]:
    """Parse JSON bytes that must hold an object; 400 otherwise."""
    try:
        data = json.loads(
            body, parse_float=parse_float, parse_constant=_reject_constant
        )
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} is nested too deeply") from None
    except ValueError as exc:
        message = f"{what} is not valid JSON: {exc}"
        raise ApiError(HTTPStatus.BAD_REQUEST, message) from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} must be a JSON object")
    return data


def _reject_constant(name: str) -> None:
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not allowed")


# --- end of shared: http ---


class Unreachable(ApiError):
    """No connection to inventory could be opened: the request never left."""


# --- Main ---


# --- shared: bind (identical in gateway.py, inventory.py) ---
def bind_or_exit(
    server_class: Callable[..., Server], prefix: str, config: dict[str, str], *args: Any
) -> Server:
    """server_class((HOST, PORT), *args); one line naming the fix if it cannot bind."""
    host, port = config[f"{prefix}_HOST"], config[f"{prefix}_PORT"]
    try:
        return server_class((host, int(port)), *args)
    except OSError as exc:
        name = prefix.lower()
        sys.exit(
            f"{name}: {prefix}_HOST={host} {prefix}_PORT={port}: "
            f"{exc.strerror or exc}. .env holds the VM's address; to run on this "
            f"machine: {prefix}_HOST=127.0.0.1 python {name}.py (and another "
            f"{prefix}_PORT if that one is in use)"
        )


def int_setting(name: str, default: int) -> int:
    """A whole-number setting of 1 or more from the environment, else default."""
    text = os.environ.get(name, "").strip() or str(default)
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 2**31:
        sys.exit(f"{name}={text}: must be a whole number from 1 to {2**31 - 1}")
    return int(text)


# --- end of shared: bind ---


# --- shared: logging (identical in gateway.py, inventory.py, billing.py) ---
def setup_logging(name: str, level: str) -> None:
    """Log DEBUG and INFO to stdout, WARNING and above to stderr (PM2's two files)."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    try:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            handlers=[out, err],
        )
    except ValueError:
        sys.exit(f"{name}: LOG_LEVEL={level}: use DEBUG, INFO, WARNING or ERROR")


# --- end of shared: logging ---


def main() -> None:
    """Connect to RabbitMQ in the background and serve until SIGTERM or SIGINT."""
    config = load_config("gateway", REQUIRED)
    setup_logging("gateway", os.environ.get("LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    # No blocked_connection_timeout: a connection blocked by an alarm is kept,
    # orders get 503 meanwhile (on_blocked), and flow again once it ends.
    params = connection_parameters(config, "gateway")
    publisher = Publisher(params, config["RABBITMQ_QUEUE"])
    publisher.start()
    # Inventory admits as many connections from this address: never more, with
    # the HEALTH_CONNECTIONS of /health.
    per_client = int_setting("MAX_CONNECTIONS_PER_CLIENT", CONNECTIONS_PER_CLIENT)
    hosts = os.environ.get("INVENTORY_HOSTS") or config["INVENTORY_HOST"]
    port, timeout = int(config["INVENTORY_PORT"]), float(config["INVENTORY_TIMEOUT"])
    size = max(1, per_client - HEALTH_CONNECTIONS)
    addresses = [host.strip() for host in hosts.split(",") if host.strip()]
    upstream = Upstreams([Upstream(host, port, timeout, size) for host in addresses])
    probes = [Upstream(h, port, HEALTH_TIMEOUT, HEALTH_CONNECTIONS) for h in addresses]
    checks_stop = threading.Event()
    upstream.watch(probes, checks_stop)
    routes = build_routes(upstream, publisher, probes)
    server = bind_or_exit(Server, "GATEWAY", config, routes)
    server.per_client = per_client
    host, port = server.server_address[:2]
    log.info("gateway listening on http://%s:%s", host, port)
    server.serve_until_signal()
    checks_stop.set()
    publisher.stop()
    log.info("gateway stopped")


if __name__ == "__main__":
    main()
