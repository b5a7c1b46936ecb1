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
LOG_LEVEL (INFO).

Every answer carries an X-Request-Id (the client's, if sane), also sent to
inventory and written in the access line (LOG_LEVEL=DEBUG). POST /api/billing
answers the order's message id in X-Message-Id and logs it with the request id;
billing logs it too.
"""

import collections
import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import Generator
from collections.abc import Iterator
from collections.abc import Mapping
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
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
MAX_ORDER_BODY = 64 * 1024
MAX_DB_INT = 2**31 - 1
MAX_AMOUNT = Decimal("9999999999.99")  # numeric(12, 2)
REQUEST_TIMEOUT = 10  # seconds a client has to send a whole request
# A request line and headers together; browsers and curl stay under 16 KiB
# (nginx refuses beyond 32 KiB by default), so only an abuse reaches it.
MAX_HEAD = 64 * 1024
SHUTDOWN_GRACE = 3  # seconds for requests in flight at SIGTERM (PM2 kills at 5)
MAX_CONNECTIONS = 512  # open client connections, one thread each
PUBLISH_TIMEOUT = 4  # seconds to wait for RabbitMQ's confirm before 503
ACCESS_REFUSED = 403  # AMQP reply code: the user lacks the right
UPSTREAM_IDLE = 4  # seconds an idle upstream connection is kept (inventory: 10)
# One line per request (method, path, status, duration, request id): at INFO
# it cost W1 18% of its throughput (same-run bench), so LOG_LEVEL=DEBUG only.
ACCESS_LEVEL = logging.DEBUG
QUEUE_STATE_AGE = 1.0  # seconds /health reuses its reading of the billing queue
QUEUE_STATE_WAIT = 1.0  # seconds /health waits for RabbitMQ to tell it
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
ORDER_FIELDS = ("user_id", "number_of_items", "total_amount")
_INTEGER = re.compile(r"[0-9]{1,10}")
_AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")
_CONTROL_IN_VALUE = re.compile(r"[\r\n\x00]")  # never forwarded raw
_ASSET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a client's id we keep

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


def load_config():
    """Read settings from the environment (and .env); exit if any is missing."""
    load_dotenv(HERE / ".env")
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        sys.exit(f"gateway: missing settings: {', '.join(missing)}")
    return {k: os.environ[k] for k in REQUIRED}


def queue_arguments(queue):
    """The billing queue's arguments; billing.py declares it identically."""
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dead",
    }


# --- Errors and validation ---


class ApiError(Exception):
    """An error answered to the client as {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def _bad(message):
    """Return a 400 error."""
    return ApiError(HTTPStatus.BAD_REQUEST, message)


def check_positive_int(value, field):
    """Accept a positive integer, as a JSON number or a string of digits."""
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_DB_INT:
        raise _bad(f"'{field}' must be a positive integer (at most {MAX_DB_INT})")
    return value


def check_amount(value, field):
    """Accept an amount >= 0 with at most two decimals, as a number or string."""
    if isinstance(value, str) and _AMOUNT.fullmatch(value):
        value = Decimal(value)
    if type(value) is int:
        value = Decimal(value)
    if (
        not isinstance(value, Decimal)
        or not value.is_finite()
        or not 0 <= value <= MAX_AMOUNT
        or value != value.quantize(Decimal("0.01"), rounding="ROUND_DOWN")
    ):
        raise _bad(f"'{field}' must be an amount from 0 to {MAX_AMOUNT}, 2 decimals")
    return value


def validate_order(data):
    """Check an order object: exactly the three fields, each valid; its user_id."""
    unknown = sorted(set(data) - set(ORDER_FIELDS))
    if unknown:
        raise _bad(f"unknown field '{unknown[0]}'")
    for field in ORDER_FIELDS:
        if field not in data:
            raise _bad(f"'{field}' is required")
    user_id = check_positive_int(data["user_id"], "user_id")
    check_positive_int(data["number_of_items"], "number_of_items")
    check_amount(data["total_amount"], "total_amount")
    return user_id


def idempotency_key(headers):
    """The request's Idempotency-Key header (or None); 400 if malformed."""
    keys = headers.get_all("Idempotency-Key") or []
    if len(keys) > 1:
        raise _bad("send one Idempotency-Key header, not several")
    if keys and not _IDEMPOTENCY_KEY.fullmatch(keys[0]):
        raise _bad("Idempotency-Key must be 1 to 200 visible ASCII characters")
    return keys[0] if keys else None


def request_id(headers):
    """The client's X-Request-Id if it sent one sane value, else a new id."""
    sent = headers.get_all("X-Request-Id")
    if sent and len(sent) == 1 and _REQUEST_ID.fullmatch(sent[0]):
        return sent[0]
    return os.urandom(8).hex()  # 0.3 us; uuid4 takes 1.4


def decode_object(body, what):
    """Parse JSON bytes that must hold an object; 400 otherwise."""
    try:
        data = json.loads(body, parse_float=_decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise _bad(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _bad(f"{what} must be a JSON object")
    return data


def _decimal(text):
    """A JSON number with a fraction or exponent, as a Decimal; ValueError if absurd."""
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent beyond what Decimal can hold
        raise ValueError(f"number {text[:20]}... is out of range") from None


def _reject_constant(name):
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not allowed")


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
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    """A request's bytes, head and body for one write; refuse CR, LF or NUL."""
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
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


class Upstream:
    """Keep-alive HTTP connections to inventory, shared by request threads."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._idle: collections.deque[tuple[_Link, float]] = collections.deque()

    def _connect(self) -> "_Link":
        """Open a new connection; raise ApiError 502 when inventory is down."""
        try:
            sock = socket.create_connection((self.host, self.port), self.timeout)
        except OSError as exc:
            log.warning("inventory unreachable: %s", exc)
            raise ApiError(HTTPStatus.BAD_GATEWAY, "inventory unreachable") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Link(sock)

    def _take(self) -> "_Link | None":
        """Reuse the most recent idle connection, or None."""
        while True:
            try:
                conn, used = self._idle.pop()
            except IndexError:
                return None
            if time.monotonic() - used < UPSTREAM_IDLE:
                return conn
            conn.close()

    def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, Fields, bytes | Iterator[bytes]]:
        """Send one request; return (status, headers, body or its chunks)."""
        data = write_request(method, path, f"{self.host}:{self.port}", headers, body)
        conn = self._take()
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

    def _exchange(
        self, conn: "_Link", method: str, data: bytes
    ) -> tuple[int, Fields, bytes | Iterator[bytes]]:
        """Send data in one write and read the answer; keep conn if reusable."""
        try:
            conn.sock.sendall(data)
            status, http11, fields = read_head(conn.rfile)
            framing, keep = body_framing(method, status, http11, fields)
            if framing == CHUNKED:
                return status, fields, self._relay(conn, keep)
            if isinstance(framing, int):
                body = read_length(conn.rfile, framing)
            else:
                body = read_until_close(conn.rfile)
        except TimeoutError:
            conn.close()
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, "inventory timed out") from None
        except (UpstreamClosed, ConnectionError):
            raise  # request decides: retry or 502
        except (OSError, UpstreamError) as exc:
            conn.close()
            log.warning("inventory failed: %s", exc)
            raise ApiError(HTTPStatus.BAD_GATEWAY, "inventory failed") from None
        self._release(conn, keep)
        return status, fields, body

    def _release(self, conn: "_Link", keep: bool) -> None:
        """Keep conn for the next request, unless it is to be closed."""
        if keep:
            self._idle.append((conn, time.monotonic()))
        else:
            conn.close()

    def _relay(self, conn: "_Link", keep: bool) -> Iterator[bytes]:
        """Yield the chunks as they come; raise UpstreamError or OSError mid-way."""
        complete = False
        try:
            yield from read_chunks(conn.rfile)
            complete = True
        finally:
            self._release(conn, keep and complete)


class _Link:
    """One keep-alive socket to inventory with a buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def close(self) -> None:
        """Close the reader and the socket."""
        self.rfile.close()
        self.sock.close()


# --- RabbitMQ publisher ---


class _Outgoing:
    """One order on its way to RabbitMQ, and the future its request waits on."""

    def __init__(self, future, body, properties):
        self.future, self.body, self.properties = future, body, properties
        self.retried = False  # published again after declaring the queues


class Publisher:
    """Owns the RabbitMQ connection in one thread; others hand it messages.

    Messages are published with `mandatory` on a confirming channel, and the
    caller waits for RabbitMQ's ack: only then is an order safe. A message that
    comes back unroutable (the queue was deleted) is published once more after
    declaring the queues again. A user without the right to declare queues (the
    gateway's on the VMs may only publish) checks that they exist instead.
    """

    def __init__(self, params, queue):
        self.params, self.queue = params, queue
        self.ready = threading.Event()
        self.problem = "connecting"  # why orders cannot be published now
        self._stop = threading.Event()
        self._thread = None
        self._conn = None
        self._channel = None
        self._pending = {}  # delivery tag -> _Outgoing
        self._waiting = []  # returned messages waiting for the queues' declaration
        # Message ids RabbitMQ could not route, counted: two publishes of one
        # Idempotency-Key share a message id.
        self._returned = collections.Counter()
        self._tag = 0
        self._was_ready = False
        self._state = None  # (consumers, ready) of the queue, or why unknown
        self._state_time = -QUEUE_STATE_AGE
        self._state_lock = threading.Lock()
        self._check_only = False  # the broker refused to let us declare queues

    def start(self):
        """Connect in a background thread, reconnecting until stop()."""
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self):
        """Close the connection and end the thread (main() calls it at exit)."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.ioloop.add_callback_threadsafe(self._close)
        if self._thread is not None:
            self._thread.join(5)

    def status(self):
        """None while orders can be published, else why not (for /health)."""
        if self._thread is None or not self._thread.is_alive():
            return "publisher not running"
        return None if self.ready.is_set() else self.problem

    def queue_state(self):
        """(consumers, ready messages) of the queue, or why it cannot be read.

        Read at most once per QUEUE_STATE_AGE, whoever asks: callers meanwhile
        get the last reading, so /health cannot be used to hammer RabbitMQ.
        """
        with self._state_lock:
            if time.monotonic() - self._state_time >= QUEUE_STATE_AGE:
                self._state = self._read_queue_state()
                self._state_time = time.monotonic()
            return self._state

    def _read_queue_state(self):
        """Ask the ioloop thread to read the queue; wait QUEUE_STATE_WAIT at most."""
        future = concurrent.futures.Future()
        conn = self._conn
        if conn is None or not self.ready.is_set():
            return "RabbitMQ not connected"
        try:
            conn.ioloop.add_callback_threadsafe(lambda: self._probe(future))
            return future.result(timeout=QUEUE_STATE_WAIT)
        except concurrent.futures.TimeoutError:
            return "RabbitMQ did not answer in time"
        except (OSError, AMQPError) as exc:
            return str(exc)

    def publish(self, body, message_id):
        """Publish body and wait for the confirm; ApiError 503 if it fails."""
        future = concurrent.futures.Future()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            timestamp=int(time.time()),
        )
        outgoing = _Outgoing(future, body, properties)
        conn = self._conn
        if conn is None or not self.ready.is_set():
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "message broker unavailable")
        try:
            conn.ioloop.add_callback_threadsafe(lambda: self._send(outgoing))
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

    def _run(self):
        """Connection loop: connect, serve the ioloop, back off, repeat.

        Nothing ends it but stop(): an error while connecting (out of file
        descriptors, say) is logged and retried like a refused connection.
        """
        delay = 0.5
        while not self._stop.is_set():
            self._was_ready = False
            try:
                self._serve()
            except Exception as exc:
                log.exception("publisher failed")
                self.problem = f"publisher failed: {exc}"
            self.ready.clear()
            self._conn = self._channel = None
            self._fail_all("connection lost")
            delay = 0.5 if self._was_ready else min(delay * 2, 5)
            self._stop.wait(delay)

    def _serve(self):
        """Open one connection and run its ioloop until the connection ends."""
        ioloop = IOLoop()
        try:
            self._conn = pika.SelectConnection(
                self.params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
                custom_ioloop=ioloop,
            )
            ioloop.start()
        finally:
            self._conn = None
            ioloop.close()  # its epoll and wake-up sockets, else leaked each time

    def _close(self):
        """Close the connection (stop() asks, in the ioloop thread)."""
        conn = self._conn
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    def _on_open(self, conn):
        """pika: the connection is open; open a channel next."""
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn, error):
        """pika: the connection could not be opened; _run backs off and retries."""
        log.warning("RabbitMQ unreachable: %s", error)
        self.problem = f"unreachable: {error}"
        conn.ioloop.stop()

    def _on_closed(self, conn, reason):
        """pika: an open connection closed; _run reconnects."""
        log.warning("RabbitMQ connection closed: %s", reason)
        self.ready.clear()
        self.problem = f"connection closed: {reason}"
        conn.ioloop.stop()

    def _on_channel(self, channel):
        """pika: the channel is open; turn on confirms, then declare the queues."""
        self._tag = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            self._on_confirm,
            callback=lambda _: self._declare(channel, lambda: self._on_ready(channel)),
        )

    def _declare(self, channel, then):
        """Declare the dead-letter queue, then the queue (both durable); then then().

        Once the broker has refused a declaration, only check (passively) that
        both exist: a missing queue then closes the channel and orders get 503.
        """
        if self._check_only:
            dead, main = {"passive": True}, {"passive": True}
        else:
            dead, main = {}, {"arguments": queue_arguments(self.queue)}
        channel.queue_declare(
            f"{self.queue}.dead",
            durable=True,
            **dead,
            callback=lambda _: channel.queue_declare(
                self.queue, durable=True, **main, callback=lambda _: then()
            ),
        )

    def _on_ready(self, channel):
        """The queues exist: take orders."""
        self._channel = channel
        self._was_ready = True
        self.ready.set()
        log.info("publishing to queue %s", self.queue)

    def _on_channel_closed(self, channel, reason):
        """pika: the channel closed (a failed declaration, say): reconnect.

        A declaration refused for lack of rights opens a new channel at once,
        which only checks that the queues exist.
        """
        self.ready.clear()
        self.problem = f"channel closed: {reason}"
        self._channel = None
        self._fail_all("channel closed")
        refused = getattr(reason, "reply_code", None) == ACCESS_REFUSED
        conn = self._conn
        if refused and not self._check_only and conn is not None and conn.is_open:
            log.info("may not declare queue %s: checking that it exists", self.queue)
            self._check_only = True
            conn.channel(on_open_callback=self._on_channel)
            return
        log.warning("RabbitMQ channel closed: %s", reason)
        if conn is not None and conn.is_open:
            conn.close()

    def _send(self, outgoing):
        """Publish one message (runs in the ioloop thread)."""
        if self._channel is None:
            outgoing.future.set_exception(ConnectionError("not connected"))
            return
        self._tag += 1
        self._pending[self._tag] = outgoing
        try:
            self._channel.basic_publish(
                "", self.queue, outgoing.body, outgoing.properties, mandatory=True
            )
        except AMQPError as exc:
            self._pending.pop(self._tag, None)
            outgoing.future.set_exception(exc)

    def _on_return(self, channel, method, properties, body):
        """pika: RabbitMQ could not route a message (its ack follows)."""
        self._returned[properties.message_id] += 1

    def _on_confirm(self, frame):
        """Settle the futures an ack or nack covers; retry returned ones once."""
        method = frame.method
        if method.multiple:
            tags = [t for t in self._pending if t <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            outgoing = self._pending.pop(tag, None)
            if outgoing is None:
                continue
            message_id = outgoing.properties.message_id
            if self._returned[message_id]:
                self._returned -= collections.Counter([message_id])
                if outgoing.retried:
                    outgoing.future.set_exception(
                        ConnectionError("message was unroutable")
                    )
                else:
                    self._redeclare(outgoing)
            elif isinstance(method, Basic.Ack):
                outgoing.future.set_result(None)
            else:
                outgoing.future.set_exception(ConnectionError("message was nacked"))

    def _redeclare(self, outgoing):
        """Declare the queues again (someone deleted them), then resend outgoing."""
        self._waiting.append(outgoing)
        if len(self._waiting) == 1:  # else a declaration is already on its way
            log.warning("queue %s is gone: declaring it again", self.queue)
            self._declare(self._channel, self._on_redeclared)

    def _on_redeclared(self):
        """The queues exist again: publish the returned messages once more."""
        waiting, self._waiting = self._waiting, []
        for outgoing in waiting:
            outgoing.retried = True
            self._send(outgoing)

    def _probe(self, future):
        """Open a channel to read the queue passively (ioloop thread).

        A channel of its own: if the queue is gone, RabbitMQ closes this one,
        not the channel orders are published on.
        """
        conn = self._conn
        if conn is None or not conn.is_open:
            future.set_exception(ConnectionError("RabbitMQ not connected"))
            return
        conn.channel(on_open_callback=lambda ch: self._on_probe_open(ch, future))

    def _on_probe_open(self, channel, future):
        """pika: the probe's channel is open; declare the queue passively."""
        channel.add_on_close_callback(lambda _, reason: _fail(future, reason))
        channel.queue_declare(
            self.queue,
            passive=True,
            callback=lambda frame: self._on_probe_declareok(channel, frame, future),
        )

    def _on_probe_declareok(self, channel, frame, future):
        """pika: RabbitMQ told the queue's figures; close the probe's channel."""
        if not future.done():
            future.set_result((frame.method.consumer_count, frame.method.message_count))
        channel.close()

    def _fail_all(self, reason):
        """Fail every unconfirmed publish (the caller answers 503)."""
        waiting = [*self._pending.values(), *self._waiting]
        self._pending, self._waiting = {}, []
        self._returned.clear()
        for outgoing in waiting:
            if not outgoing.future.done():
                outgoing.future.set_exception(ConnectionError(reason))


def _fail(future, reason):
    """Settle future with a closed channel's reason, unless already settled."""
    if not future.done():
        future.set_exception(ConnectionError(getattr(reason, "reply_text", reason)))


# --- Handlers ---


def proxy_movies(req):
    """Any /api/movies... request: forward to inventory, answer as it did."""
    body = None
    if req.command in ("POST", "PUT") or req.body_length:
        body = req.read_body(MAX_PROXY_BODY)
    headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP}
    headers["X-Forwarded-For"] = req.client_address[0]
    headers["X-Request-Id"] = req.request_id
    status, upstream_headers, data = req.server.upstream.request(
        req.command, req.path, body, headers
    )
    kept = {k: v for k, v in upstream_headers if k.lower() not in DROP_FROM_UPSTREAM}
    return status, data, kept


def post_billing(req):
    """POST /api/billing: validate the order and publish it with a confirm."""
    body = req.read_body(MAX_ORDER_BODY, json_only=True)
    user_id = validate_order(decode_object(body, "request body"))
    key = idempotency_key(req.headers)
    # billing stores each message_id once: a retry with the same key (of the
    # same user) is a no-op, even if the first attempt's answer was lost.
    message_id = uuid.uuid4().hex if key is None else f"key:{user_id}:{key}"
    req.server.publisher.publish(body, message_id)
    log.info("order %s published, request %s", message_id, req.request_id)
    return HTTPStatus.OK, {"message": "Message posted"}, {"X-Message-Id": message_id}


def health(req):
    """GET /health: 503 if orders or inventory fail; 200 "degraded" if billing does."""
    report = {"status": "ok", "inventory": "ok", "rabbitmq": "ok", "billing": "ok"}
    try:
        status, _, _ = req.server.upstream.request("GET", "/health", None, {})
        if status >= 500:
            report["inventory"] = f"answers {status}"
    except ApiError as exc:
        report["inventory"] = exc.message
    publisher = req.server.publisher
    problem = publisher.status()
    if problem is not None:
        report["rabbitmq"] = problem
    state = publisher.queue_state()
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
        return HTTPStatus.SERVICE_UNAVAILABLE, report
    if report["billing"] != "ok":
        report["status"] = "degraded"  # orders are still taken and kept
    return HTTPStatus.OK, report


def get_spec(req):
    """GET /openapi.yaml: the committed API description."""
    return HTTPStatus.OK, SPEC_FILE.read_bytes(), {"Content-Type": "application/yaml"}


def get_docs(req):
    """GET /docs: a page that renders the API description with Swagger UI."""
    return (
        HTTPStatus.OK,
        DOCS_PAGE.encode(),
        {"Content-Type": "text/html; charset=utf-8"},
    )


def get_docs_asset(req, name):
    """GET /docs/<file>: Swagger UI's files, installed from npm by the setup."""
    path = DOCS_ASSETS / name
    if not _ASSET.fullmatch(name) or not path.is_file():
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name} (run npm ci)")
    kinds = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
    ctype = kinds.get(path.suffix, "application/octet-stream")
    return HTTPStatus.OK, path.read_bytes(), {"Content-Type": ctype}


ROUTES = [
    ("*", re.compile(r"/api/movies(/.*)?"), proxy_movies),
    ("POST", re.compile(r"/api/billing/?"), post_billing),
    ("GET", re.compile(r"/health/?"), health),
    ("GET", re.compile(r"/openapi\.yaml"), get_spec),
    ("GET", re.compile(r"/docs/?"), get_docs),
    ("GET", re.compile(r"/docs/(?P<name>[^/]+)"), get_docs_asset),
]


# --- HTTP ---


class Server(ThreadingHTTPServer):
    """A threading server with a connection cap and a deadline per request."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, upstream, publisher):
        super().__init__(address, Handler)
        self.upstream, self.publisher = upstream, publisher
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._deadlines = {}
        self.cut = set()  # sockets the reaper cut off mid-request
        self.busy = set()  # connections with a request in progress
        self.stopping = False
        self._lock = threading.Lock()
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()

    def process_request(self, request, client_address):
        """Serve in a thread, or turn the client away when at the cap."""
        if not self._slots.acquire(blocking=False):
            _refuse(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.watch(request, None)
            with self._lock:
                self.cut.discard(request)
            self._slots.release()

    def watch(self, sock, seconds):
        """Give sock `seconds` to deliver its request; None stops watching."""
        with self._lock:
            if seconds is None:
                self._deadlines.pop(sock, None)
            else:
                self._deadlines[sock] = time.monotonic() + seconds

    def _reap(self):
        """Cut the read side of connections past their deadline (idle or slow)."""
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                late = [s for s, t in self._deadlines.items() if t < now]
                for sock in late:
                    del self._deadlines[sock]
                self.cut.update(late)
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)

    def stop(self):
        """Refuse new connections at once, then end serve_forever (another thread)."""
        self.stopping = True
        with contextlib.suppress(OSError):  # Linux refuses connects from now on
            self.socket.shutdown(socket.SHUT_RDWR)
        self.shutdown()

    def finish(self, grace):
        """Once serve_forever returned, wait up to grace seconds for requests."""
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy:
            log.warning("stopping with %d requests unfinished", len(self.busy))

    def handle_error(self, request, client_address):
        """Log unexpected errors; ordinary disconnects are a debug line."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 method syntax
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_NON_ASCII = re.compile(r"[\x80-\xff]")  # raw bytes, as http.server decoded them
# name ":" value, CRLF (or LF): a token for the name, no space before the colon,
# no control character but HTAB in the value (so no bare CR, no NUL)
_HEADER_LINE = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r?\n"
)


class _HeadReader:
    """Hands http.server the header lines, refusing any it could misread.

    Its email parser takes a bare CR for a line end, unfolds continuation
    lines and reads everything after a line without a colon as body: here
    each is an error, as is a head over MAX_HEAD or one the client never ended.
    """

    def __init__(self, rfile, budget):
        self.rfile, self.budget, self.error = rfile, budget, None

    def readline(self, size=-1):
        """The next header line; after a problem, the end of the head."""
        if self.error:
            return b"\r\n"
        line = self.rfile.readline(max(self.budget, 0) + 1)
        self.budget -= len(line)
        if line in (b"\r\n", b"\n"):
            return line
        if self.budget < 0:
            self.error = (
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request line and headers over {MAX_HEAD} bytes",
            )
        elif not line.endswith(b"\n"):
            self.error = (HTTPStatus.BAD_REQUEST, "request headers cut off")
        elif not _HEADER_LINE.fullmatch(line):
            self.error = (HTTPStatus.BAD_REQUEST, "malformed header line")
        else:
            return line
        return b"\r\n"


def _percent_encode(match):
    """Percent-encode one raw byte of the request target."""
    return f"%{ord(match.group()):02X}"


def _refuse(sock):
    """Answer 503 on a connection the server has no room for."""
    body = b'{"error": "server busy, try again"}'
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.sendall(head.encode() + body)


class Handler(BaseHTTPRequestHandler):
    """Parses requests, dispatches them through ROUTES and writes answers."""

    protocol_version = "HTTP/1.1"
    server_version = "gateway/1.0"
    timeout = REQUEST_TIMEOUT + 5  # backstop; the reaper enforces the deadline

    def setup(self):
        """Disable Nagle: headers and body go out in separate writes."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        """Read and answer one request within REQUEST_TIMEOUT; log its access line."""
        self.server.watch(self.connection, REQUEST_TIMEOUT)
        self.request_id = self._status = self.command = None
        self.path = "-"
        self._started = time.monotonic()  # until the request line: see parse_request
        try:
            super().handle_one_request()
        finally:
            self.server.busy.discard(self.connection)
        if self._status is not None:
            log.log(
                ACCESS_LEVEL,
                "%s %s %s %.1fms %s",
                self.command,
                _CONTROL.sub("?", self.path),
                self._status,
                (time.monotonic() - self._started) * 1000,
                self.request_id,
            )

    def parse_request(self):
        """Parse the head; refuse one cut off, malformed or with ambiguous framing."""
        self._started = time.monotonic()
        self.server.busy.add(self.connection)
        self.body_length, self._expect_100 = 0, False
        if self.raw_requestline.endswith(b"\n"):
            head = _HeadReader(self.rfile, MAX_HEAD - len(self.raw_requestline))
            self.rfile = head  # http.server reads the header lines through it
            try:
                ok = super().parse_request()  # answers 400 itself when not ok
            finally:
                self.rfile = head.rfile
            timed_out = ok and self.connection in self.server.cut
            if ok and not timed_out:
                self.request_id = request_id(self.headers)
                if head.error:
                    self.send_error(*head.error)
                    return False
                return self._check_framing() and self._check_target()
        else:  # cut off mid-line, or the client closed
            ok, timed_out = False, self.connection in self.server.cut
        if timed_out:
            self.command, self.request_version = None, "HTTP/1.1"
            self.requestline = self.raw_requestline.decode("latin-1").rstrip()
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "request not received in time")
            return False
        return ok

    def _check_framing(self):
        """Set body_length from Content-Length; refuse any other framing."""
        lengths = self.headers.get_all("Content-Length")
        if "Transfer-Encoding" in self.headers:
            if lengths:
                self.send_error(
                    HTTPStatus.BAD_REQUEST,
                    "send Content-Length or Transfer-Encoding, not both",
                )
            else:  # we cannot tell where the body ends
                self.send_error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
            return False
        if lengths:
            # RFC 9112 6.3: identical repeated values stand for that one value.
            values = {v.strip(" \t") for line in lengths for v in line.split(",")}
            text = values.pop()
            if values or not text.isascii() or not text.isdigit() or len(text) > 18:
                self.send_error(
                    HTTPStatus.BAD_REQUEST,
                    "Content-Length must be one non-negative integer",
                )
                return False
            self.body_length = int(text)
        return True

    def handle_expect_100(self):
        """Send 100 Continue only once the body is wanted (see read_length)."""
        self._expect_100 = True
        return True

    def _check_target(self):
        """Refuse odd methods and control characters; percent-encode non-ASCII."""
        if not _TOKEN.fullmatch(self.command):
            self.send_error(HTTPStatus.BAD_REQUEST, "invalid method")
            return False
        if _CONTROL.search(self.path):
            self.send_error(HTTPStatus.BAD_REQUEST, "control character in the URL")
            return False
        self.path = _NON_ASCII.sub(_percent_encode, self.path)
        return True

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def dispatch(self):
        """Route the request, run its handler and write the answer."""
        self._body_read = False
        try:
            handler, params = self._route(urlsplit(self.path).path)
            result = handler(self, **params)
            status, payload, headers = (*result, {})[:3]
        except ApiError as exc:
            status, payload, headers = exc.status, {"error": exc.message}, {}
            if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
                headers = {"Allow": exc.allow}
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            status, payload, headers = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "internal error"},
                {},
            )
        if not self._body_read and self.body_length:
            self.close_connection = True  # the unread body would poison the stream
        self.respond(status, payload, headers)

    def _route(self, path):
        """Find the handler for path and method, or raise 404/405."""
        allowed = []
        for method, pattern, handler in ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if method in ("*", self.command):
                    return handler, match.groupdict()
                allowed.append(method)
        if not allowed:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {path}")
        error = ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} not allowed")
        error.allow = ", ".join(allowed)
        raise error

    def read_body(self, limit, json_only=False):
        """Read the raw body, enforcing Content-Length, size and (if asked) JSON."""
        if json_only:
            media = self.headers.get("Content-Type", "application/json")
            media = media.split(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise ApiError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type must be application/json",
                )
        return self.read_length(limit)

    def read_length(self, limit):
        """Read the body_length bytes of the body (413 beyond limit)."""
        if self.body_length > limit:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes"
            )
        if self._expect_100 and self.body_length:
            self._expect_100 = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(self.body_length)
        self._body_read = True
        self.server.watch(self.connection, None)
        if len(body) < self.body_length:
            self.close_connection = True
            raise ApiError(
                HTTPStatus.REQUEST_TIMEOUT, "request body not received in time"
            )
        return body

    def respond(self, status, payload, headers=None):
        """Write a response (JSON unless headers say) with an exact Content-Length."""
        self.server.watch(self.connection, None)
        if self.server.stopping:
            self.close_connection = True  # the last answer on this connection
        if isinstance(payload, types.GeneratorType):
            self._respond_chunked(status, payload, headers)
            return
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = dict(headers or {})
        self.send_response(status)
        self.send_header(
            "Content-Type", headers.pop("Content-Type", "application/json")
        )
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one syscall, one packet.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def _respond_chunked(self, status, pieces, headers):
        """Relay a response of unknown length: chunked, or until the close."""
        chunked = self.request_version >= "HTTP/1.1"  # HTTP/1.0 cannot read chunks
        self.close_connection = self.close_connection or not chunked
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            for data in pieces:
                self.wfile.write(
                    b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
                )
        except (OSError, http.client.HTTPException) as exc:
            # Too late for an error status: cut the connection so the client
            # sees a truncated body rather than a complete-looking one.
            log.warning("relaying %s stopped: %s", self.path, exc)
            self.close_connection = True
            pieces.close()
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def send_error(self, code, message=None, explain=None):
        """Answer http.server's own errors (bad request line, odd method) in JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self.dispatch()  # an unknown method: proxied, 405 or 404
            return
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # always answer with a status line
        self.respond(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

    def send_response(self, code, message=None):
        """Start an answer; every one carries the request's X-Request-Id."""
        super().send_response(code, message)
        if self.request_id is None:  # refused before its headers were read
            self.request_id = os.urandom(8).hex()
        self.send_header("X-Request-Id", self.request_id)

    def log_request(self, code="-", size="-"):
        """Keep the status for the access line handle_one_request writes."""
        self._status = int(code)

    def log_message(self, format, *args):
        """Send http.server's other messages to logging at debug level."""
        log.debug("%s - %s", self.address_string(), format % args)


# --- Main ---


# --- shared: bind (identical in gateway.py, inventory.py) ---
def bind_or_exit(server_class, prefix, config, *args):
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


# --- end of shared: bind ---


# --- shared: logging (identical in gateway.py, inventory.py, billing.py) ---
def setup_logging(name, level):
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


def main():
    """Connect to RabbitMQ in the background and serve until SIGTERM or SIGINT."""
    config = load_config()
    setup_logging("gateway", os.environ.get("LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    params = pika.ConnectionParameters(
        host=config["RABBITMQ_HOST"],
        port=int(config["RABBITMQ_PORT"]),
        credentials=pika.PlainCredentials(
            config["RABBITMQ_GATEWAY_USER"], config["RABBITMQ_GATEWAY_PASSWORD"]
        ),
        heartbeat=30,
        blocked_connection_timeout=10,
        socket_timeout=3,
        stack_timeout=5,
        connection_attempts=1,
        client_properties={"connection_name": "gateway"},
    )
    publisher = Publisher(params, config["RABBITMQ_QUEUE"])
    publisher.start()
    upstream = Upstream(
        config["INVENTORY_HOST"],
        int(config["INVENTORY_PORT"]),
        float(config["INVENTORY_TIMEOUT"]),
    )
    server = bind_or_exit(Server, "GATEWAY", config, upstream, publisher)
    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log.info("gateway listening on http://%s:%s", host, port)
    server.serve_forever()
    server.finish(SHUTDOWN_GRACE)
    server.server_close()
    publisher.stop()
    log.info("gateway stopped")


if __name__ == "__main__":
    main()
