"""Inventory: a REST API for movies, stored in PostgreSQL.

Routes (a trailing slash is accepted on each):
    GET    /api/movies[?title=x&limit=n&offset=n]   list or search movies
    POST   /api/movies                              create a movie
    DELETE /api/movies                              delete every movie
    GET    /api/movies/<id>                         one movie
    PUT    /api/movies/<id>                         update title and/or description
    DELETE /api/movies/<id>                         delete one movie
    GET    /health                                  whether the database answers

Settings (environment, then .env beside this file): INVENTORY_HOST,
INVENTORY_PORT, INVENTORY_DB_HOST, INVENTORY_DB_PORT, INVENTORY_DB_SSLMODE,
INVENTORY_DB_NAME, INVENTORY_DB_USER, INVENTORY_DB_PASSWORD; optional
LOG_LEVEL (INFO). Every answer carries an X-Request-Id (the gateway's, if
sane), also written in the access line (LOG_LEVEL=DEBUG).
"""

import sys

if __name__ == "__main__":
    # Inventory speaks no TLS itself (libpq does, with its own OpenSSL), yet
    # http.server and asyncio would import Python's ssl: a second OpenSSL, ~4 MiB
    # resident. Both work without it, as on a Python built without ssl.
    sys.modules.setdefault("ssl", None)

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import threading
import time
import types
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import psycopg
from dotenv import load_dotenv
from psycopg_pool import ConnectionPool
from psycopg_pool import PoolTimeout

log = logging.getLogger("inventory")

HERE = Path(__file__).resolve().parent
MAX_BODY = 1024 * 1024
MAX_TITLE = 255
MAX_DESCRIPTION = 10_000
MAX_LIMIT = 1000
MAX_DB_INT = 2**31 - 1
REQUEST_TIMEOUT = 10  # seconds a client has to send a whole request
# A request line and headers together; browsers and curl stay under 16 KiB
# (nginx refuses beyond 32 KiB by default), so only an abuse reaches it.
MAX_HEAD = 64 * 1024
SHUTDOWN_GRACE = 3  # seconds for requests in flight at SIGTERM (PM2 kills at 5)
MAX_CONNECTIONS = 512  # open client connections, one thread each
DB_WAIT = 4  # seconds to wait for a database connection before answering 503
POOL_SIZE = 4  # enough to keep PostgreSQL busy; more only costs memory
STREAM_PAGE = 2000  # movies per page of a streamed list; shorter lists are not
PAGE_BYTES = 1024 * 1024  # JSON per page, at most (plus one movie): memory per list
# Control characters a title or description may not hold: C0 but tab, LF and CR
# (PostgreSQL's JSON spells each other one \u00XX: 6 bytes for 1).
_FORBIDDEN_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # an id we keep (gateway's)
# One line per request (method, path, status, duration, request id): at INFO
# it cost W1 18% of its throughput (same-run bench), so LOG_LEVEL=DEBUG only.
ACCESS_LEVEL = logging.DEBUG

# --- Config ---

REQUIRED = (
    "INVENTORY_HOST",
    "INVENTORY_PORT",
    "INVENTORY_DB_HOST",
    "INVENTORY_DB_PORT",
    "INVENTORY_DB_SSLMODE",
    "INVENTORY_DB_NAME",
    "INVENTORY_DB_USER",
    "INVENTORY_DB_PASSWORD",
)


def load_config():
    """Read settings from the environment (and .env); exit if any is missing."""
    load_dotenv(HERE / ".env")
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        sys.exit(f"inventory: missing settings: {', '.join(missing)}")
    return {k: os.environ[k] for k in REQUIRED}


# --- SQL ---

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(path):
    """Return {name: sql} for each '-- name: x' block in the file."""
    parts = _NAME.split(path.read_text())
    return {
        name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)
    }


QUERIES = load_queries(HERE / "sql" / "inventory_queries.sql")


def _check_connection(conn):
    """Before lending a connection, make sure the server has not closed it.

    An idle connection has nothing to read unless the server sent a goodbye
    (a restart, an idle kill); only then pay for a round trip to check it.
    """
    if select.select([conn.fileno()], [], [], 0)[0]:
        ConnectionPool.check_connection(conn)


class _JsonBytes(psycopg.adapt.Loader):
    """Text results as their UTF-8 bytes: every text column here is a JSON body
    built by PostgreSQL, sent on without decoding and encoding it again."""

    def load(self, data):
        return bytes(data)


def _configure(conn):
    conn.adapters.register_loader("text", _JsonBytes)


class Database:
    """A connection pool that runs named queries and maps outages to 503."""

    def __init__(self, conninfo):
        self.pool = ConnectionPool(
            conninfo,
            min_size=2,
            max_size=POOL_SIZE,
            timeout=DB_WAIT,
            kwargs={"autocommit": True},
            check=_check_connection,
            configure=_configure,
            reconnect_timeout=0,  # keep trying forever while the database is down
            open=False,
        )
        self._lent = 0  # connections out of the pool right now
        self._lock = threading.Lock()

    def open(self):
        """Start the pool without waiting: requests get 503 until it connects."""
        self.pool.open(wait=False)

    def close(self):
        """Close every connection."""
        self.pool.close()

    @contextlib.contextmanager
    def connection(self):
        """Lend a pooled connection; 503 when none comes within DB_WAIT."""
        try:
            with self.pool.connection() as conn:
                with self._lock:
                    self._lent += 1
                try:
                    yield conn
                finally:
                    with self._lock:
                        self._lent -= 1
        except PoolTimeout:
            if self._lent < POOL_SIZE:
                log.warning("database unavailable: no connection in %s s", DB_WAIT)
                raise ApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable"
                ) from None
            # Every connection is serving another request: the database is up.
            log.warning("database busy: all %s connections in use", POOL_SIZE)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "database busy, try again",
                {"Retry-After": "1"},
            ) from None
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s", exc)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable"
            ) from None

    def row(self, name, **params):
        """Run a named query and return its first row (or None)."""
        with self.connection() as conn:
            return conn.execute(QUERIES[name], params).fetchone()

    def one(self, name, **params):
        """Run a named query and return the first column of its first row."""
        row = self.row(name, **params)
        return None if row is None else row[0]

    def pages(self, pattern, offset, limit):
        """Yield (JSON bytes, more) pages: all movies, or `limit` of them.

        The first page starts with "[", each next one with ","; the caller
        closes the array. Pages follow each other by id (keyset), each built by
        PostgreSQL on a connection that goes back to the pool before the page is
        yielded, so a client that reads slowly never holds one. A page is at
        most STREAM_PAGE movies and PAGE_BYTES of JSON (plus one movie): memory
        stays flat whatever the table and the movies.
        """
        if pattern is None:
            name, cut = "page_movies", "cut_movies"
        else:
            name = cut = "cut_movies_by_title"
        params = {"pattern": pattern, "after": 0, "offset": offset, "lead": "["}
        params["budget"] = PAGE_BYTES
        # A title search is planned for its pattern every time: a generic plan
        # walks the primary key instead of the trigram index (150 ms at 10,000
        # movies instead of 0.2 ms).
        prepare = None if pattern is None else False
        left, rows = limit, STREAM_PAGE
        while True:
            params["limit"] = rows if left is None else min(left, rows)
            # Closing the cursor frees libpq's copy of the page before the yield.
            with self.connection() as conn, conn.cursor() as cursor:
                cursor.execute(QUERIES[name], params, prepare=prepare)
                text, kept, last, read = cursor.fetchone()
                if read and not kept:  # over the budget: cut it where it ends
                    cursor.execute(QUERIES[cut], params, prepare=prepare)
                    text, kept, last, read = cursor.fetchone()
            if left is not None:
                left -= kept
            more = (kept < read or read == params["limit"]) and left != 0
            # Ask next for what the budget held: the next page likely fits
            # whole, without the window (movies near each other are alike).
            rows = kept if kept < read else min(2 * rows, STREAM_PAGE)
            if text is not None or params["lead"] == "[":
                yield text or b"[", more
            if not more:
                return
            params.update(after=last, offset=0, lead=",")


# --- Errors and validation ---


class ApiError(Exception):
    """An error answered to the client as {"error": message}."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = headers or {}


def _bad(message):
    """Return a 400 error."""
    return ApiError(HTTPStatus.BAD_REQUEST, message)


def check_text(value, field, limit, required, stored=True):
    """Validate one string field (to be stored, or searched); return it unchanged."""
    if not isinstance(value, str):
        raise _bad(f"'{field}' must be a string")
    if len(value) > limit:
        raise _bad(f"'{field}' must be at most {limit} characters")
    if required and not value.strip():
        raise _bad(f"'{field}' must not be empty")
    if "\x00" in value:
        raise _bad(f"'{field}' must not contain NUL characters")
    if stored and _FORBIDDEN_CONTROL.search(value):
        raise _bad(f"'{field}' must not contain control characters but tab, LF, CR")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"'{field}' is not valid Unicode text") from None
    return value


def validate_movie(data, partial):
    """Check a movie body; return (title, description), None where omitted."""
    unknown = sorted(set(data) - {"title", "description"})
    if unknown:
        raise _bad(f"unknown field '{unknown[0]}'")
    if not partial and "title" not in data:
        raise _bad("'title' is required")
    if partial and not data:
        raise _bad("give 'title' and/or 'description' to update")
    title = data.get("title")
    description = data.get("description")
    if title is not None or "title" in data:
        title = check_text(title, "title", MAX_TITLE, required=True)
    if description is not None or "description" in data:
        description = check_text(description, "description", MAX_DESCRIPTION, False)
    return title, description


def parse_id(text):
    """Turn a path segment into a movie id: 400 if malformed, 404 if out of range."""
    if not text.isascii() or not text.isdigit():
        raise _bad("movie id must be a positive integer")
    if len(text.lstrip("0")) > 10 or int(text) > MAX_DB_INT:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {text} not found")
    if int(text) == 0:
        raise _bad("movie id must be a positive integer")
    return int(text)


def parse_count(query, name, low, high):
    """Read an optional integer query parameter within [low, high]."""
    text = query.get(name)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise _bad(f"'{name}' must be an integer from {low} to {high}")
    value = int(text)
    if not low <= value <= high:
        raise _bad(f"'{name}' must be an integer from {low} to {high}")
    return value


def like_pattern(text):
    """Build an ILIKE pattern matching text literally anywhere in a title."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# --- Handlers ---


def list_movies(req):
    """GET /api/movies: every movie, or those whose title contains ?title=."""
    title = req.query.get("title")
    pattern = None
    if title:
        text = check_text(title, "title", MAX_TITLE, required=False, stored=False)
        pattern = like_pattern(text)
    limit = parse_count(req.query, "limit", 1, MAX_LIMIT)
    offset = parse_count(req.query, "offset", 0, MAX_DB_INT) or 0
    pages = req.db.pages(pattern, offset, limit)
    first, more = next(pages)
    if not more:
        return HTTPStatus.OK, first + b"]"
    return HTTPStatus.OK, _json_array(first, pages)


def _json_array(first, rest):
    """Yield the pages of one JSON array as they come, then its end."""
    yield first
    for text, _ in rest:
        yield text
    yield b"]"


def create_movie(req):
    """POST /api/movies: create a movie from {title, description}."""
    title, description = validate_movie(req.json_body(), partial=False)
    movie_id, body = req.db.row(
        "insert_movie", title=title, description=description or ""
    )
    return HTTPStatus.CREATED, body, {"Location": f"/api/movies/{movie_id}"}


def delete_movies(req):
    """DELETE /api/movies: remove every movie."""
    count = req.db.one("delete_all_movies")
    return HTTPStatus.OK, {"message": f"deleted {count} movies", "deleted": count}


def get_movie(req, movie_id):
    """GET /api/movies/<id>."""
    movie_id = parse_id(movie_id)
    body = req.db.one("get_movie", id=movie_id)
    if body is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {movie_id} not found")
    return HTTPStatus.OK, body


def update_movie(req, movie_id):
    """PUT /api/movies/<id>: change the fields given, keep the others."""
    movie_id = parse_id(movie_id)
    title, description = validate_movie(req.json_body(), partial=True)
    body = req.db.one("update_movie", id=movie_id, title=title, description=description)
    if body is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {movie_id} not found")
    return HTTPStatus.OK, body


def delete_movie(req, movie_id):
    """DELETE /api/movies/<id>."""
    movie_id = parse_id(movie_id)
    if req.db.one("delete_movie", id=movie_id) is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {movie_id} not found")
    return HTTPStatus.OK, {"message": f"deleted movie {movie_id}", "id": movie_id}


def health(req):
    """GET /health: 200 when the database answers, else 503."""
    try:
        req.db.one("ping")
    except ApiError as exc:
        return HTTPStatus.SERVICE_UNAVAILABLE, {
            "status": "down",
            "database": exc.message,
        }
    return HTTPStatus.OK, {"status": "ok", "database": "ok"}


ROUTES = [
    ("GET", re.compile(r"/api/movies/?"), list_movies),
    ("POST", re.compile(r"/api/movies/?"), create_movie),
    ("DELETE", re.compile(r"/api/movies/?"), delete_movies),
    ("GET", re.compile(r"/api/movies/(?P<movie_id>[^/]+)/?"), get_movie),
    ("PUT", re.compile(r"/api/movies/(?P<movie_id>[^/]+)/?"), update_movie),
    ("DELETE", re.compile(r"/api/movies/(?P<movie_id>[^/]+)/?"), delete_movie),
    ("GET", re.compile(r"/health/?"), health),
]


# --- HTTP ---


class Server(ThreadingHTTPServer):
    """A threading server with a connection cap and a deadline per request."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, db):
        super().__init__(address, Handler)
        self.db = db
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
    """Parses requests, dispatches them through ROUTES and writes JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "inventory/1.0"
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

    @property
    def db(self):
        return self.server.db

    def dispatch(self):
        """Route the request, run its handler and write the answer."""
        self.query = {}
        self._body_read = False
        try:
            url = urlsplit(self.path)
            handler, params = self._route(url.path)
            self.query = _parse_query(url.query)
            result = handler(self, **params)
            status, payload, headers = (*result, {})[:3]
        except ApiError as exc:
            status, payload, headers = exc.status, {"error": exc.message}, exc.headers
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
                if method == self.command:
                    return handler, match.groupdict()
                allowed.append(method)
        if not allowed:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {path}")
        error = ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} not allowed")
        error.allow = ", ".join(allowed)
        raise error

    def json_body(self):
        """Read the body and return it as a JSON object (dict)."""
        return decode_object(self.read_body(MAX_BODY, self.headers), "request body")

    def read_body(self, limit, headers):
        """Read the raw body, enforcing Content-Type, Content-Length and size."""
        ctype = headers.get("Content-Type", "application/json")
        media = ctype.split(";")[0].strip().lower()
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
        """Write a JSON response with an exact Content-Length."""
        self.server.watch(self.connection, None)
        if self.server.stopping:
            self.close_connection = True  # the last answer on this connection
        if isinstance(payload, types.GeneratorType):
            self._respond_chunked(status, payload)
            return
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one syscall, one packet.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def _respond_chunked(self, status, pieces):
        """Stream a response of unknown length: chunked, or until the close."""
        chunked = self.request_version >= "HTTP/1.1"  # HTTP/1.0 cannot read chunks
        self.close_connection = self.close_connection or not chunked
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            for piece in pieces:
                self.wfile.write(
                    b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
                )
        except (OSError, ApiError) as exc:
            # Too late for an error status: cut the connection so the client
            # sees a truncated body rather than a complete-looking one.
            log.warning("streaming %s stopped: %s", self.path, exc)
            self.close_connection = True
            pieces.close()
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def send_error(self, code, message=None, explain=None):
        """Answer http.server's own errors (bad request line, odd method) in JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self.dispatch()  # an unknown method: 405 or 404, like any other
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


def request_id(headers):
    """The X-Request-Id sent (by the gateway) if it is one sane value, else a new id."""
    sent = headers.get_all("X-Request-Id")
    if sent and len(sent) == 1 and _REQUEST_ID.fullmatch(sent[0]):
        return sent[0]
    return os.urandom(8).hex()


def decode_object(body, what):
    """Parse JSON bytes that must hold an object; 400 otherwise."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise _bad(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _bad(f"{what} must be a JSON object")
    return data


def _reject_constant(name):
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not allowed")


def _parse_query(query):
    """Parse a query string into {name: last value}."""
    try:
        pairs = parse_qs(query, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise _bad("query string is not valid UTF-8") from None
    return {name: values[-1] for name, values in pairs.items()}


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
    """Start the pool and serve until SIGTERM or SIGINT."""
    config = load_config()
    setup_logging("inventory", os.environ.get("LOG_LEVEL", "INFO"))
    db = Database(
        psycopg.conninfo.make_conninfo(
            host=config["INVENTORY_DB_HOST"],
            port=config["INVENTORY_DB_PORT"],
            dbname=config["INVENTORY_DB_NAME"],
            user=config["INVENTORY_DB_USER"],
            password=config["INVENTORY_DB_PASSWORD"],
            sslmode=config["INVENTORY_DB_SSLMODE"],
            gssencmode="disable",  # password logins only: no Kerberos probe
            connect_timeout=3,
            application_name="inventory",
        )
    )
    db.open()
    server = bind_or_exit(Server, "INVENTORY", config, db)
    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log.info("inventory listening on http://%s:%s", host, port)
    server.serve_forever()
    server.finish(SHUTDOWN_GRACE)
    server.server_close()
    db.close()
    log.info("inventory stopped")


if __name__ == "__main__":
    main()
