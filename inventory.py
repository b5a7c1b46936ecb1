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

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Inventory speaks no TLS itself (libpq does, with its own OpenSSL), yet
    # http.server and asyncio would import Python's ssl: a second OpenSSL, ~4 MiB
    # resident. Both work without it, as on a Python built without ssl.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import collections
import contextlib
import email.utils
import functools
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from socketserver import StreamRequestHandler
from typing import Any
from typing import NamedTuple
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import psycopg
from dotenv import load_dotenv
from psycopg import pq
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
POOL_SIZE = 16  # for single rows: a request thread that waits for one costs a switch
PAGE_SLOTS = 4  # connections for list pages (each holds up to PAGE_BYTES of buffer)
SEARCH_SLOTS = 8  # a search's first pages (4 cost W2: bench/HISTORY.md)
QUERY_TIMEOUT = 5.0  # default of INVENTORY_QUERY_TIMEOUT, seconds
SEARCH_TIMEOUT = 2.0  # default of INVENTORY_SEARCH_TIMEOUT, seconds
STREAM_PAGE = 2000  # movies per page of a streamed list; shorter lists are not
PAGE_BYTES = 1024 * 1024  # JSON per page, at most (plus one movie): memory per list
SMALL_PAGE_BYTES = 12 * 1024  # under libpq's first 16 KiB of buffer (Database.pages)
# Control characters a title or description may not hold: C0 but tab, LF and CR
# (PostgreSQL's JSON spells each other one \u00XX: 6 bytes for 1).
_FORBIDDEN_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# One line per request (method, path, status, duration, request id): at INFO
# it costs a measurable share of W1's throughput (bench/HISTORY.md), so
# LOG_LEVEL=DEBUG only.
ACCESS_LEVEL = logging.DEBUG
SERVER_VERSION = "inventory/1.0"

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


# --- shared: config (identical in gateway.py, inventory.py, billing.py) ---
def load_config(name: str, required: tuple[str, ...]) -> dict[str, str]:
    """Read settings from the environment (and .env); exit if any is missing."""
    load_dotenv(HERE / ".env")
    missing = [k for k in required if not os.environ.get(k)]
    if missing:
        sys.exit(f"{name}: missing settings: {', '.join(missing)}")
    return {k: os.environ[k] for k in required}


# --- end of shared: config ---


# --- SQL ---

# --- shared: sql (identical in inventory.py, billing.py) ---
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    """Return {name: sql} for each '-- name: x' block in the file."""
    parts = _NAME.split(path.read_text())
    return {
        name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)
    }


def database_conninfo(config: dict[str, str], prefix: str, name: str) -> str:
    """libpq's connection string from the PREFIX_DB_* settings."""
    return psycopg.conninfo.make_conninfo(
        host=config[f"{prefix}_DB_HOST"],
        port=config[f"{prefix}_DB_PORT"],
        dbname=config[f"{prefix}_DB_NAME"],
        user=config[f"{prefix}_DB_USER"],
        password=config[f"{prefix}_DB_PASSWORD"],
        sslmode=config[f"{prefix}_DB_SSLMODE"],
        gssencmode="disable",  # password logins only: no Kerberos probe
        connect_timeout=3,
        application_name=name,
    )


# --- end of shared: sql ---


QUERIES = load_queries(HERE / "sql" / "inventory_queries.sql")
_PARAM = re.compile(r"%\((\w+)\)s")


class Statement(NamedTuple):
    """A named query in libpq's form: $1..$n in the SQL, their names in order."""

    name: bytes
    sql: bytes
    params: tuple[str, ...]


def to_statement(name: str, sql: str) -> Statement:
    """Number a query's %(name)s placeholders as $1..$n, by first appearance."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in order:
            order.append(match[1])
        return f"${order.index(match[1]) + 1}"

    return Statement(name.encode(), _PARAM.sub(number, sql).encode(), tuple(order))


STATEMENTS = {name: to_statement(name, sql) for name, sql in QUERIES.items()}
# Planned for their parameters every time (see Database.pages), never prepared.
UNPREPARED = {"cut_movies_by_title"}
_INTEGER_TYPES = {20, 21, 23}  # int8, int2, int4: their values come back as int
_RESULT_OK = {pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK}
UNDEFINED_STATEMENT = b"26000"  # SQLSTATE: no prepared statement of that name


def _checked(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> pq.abc.PGresult:
    """The result, or its error raised as psycopg would raise it."""
    if result.status in _RESULT_OK:
        return result
    if pgconn.status != pq.ConnStatus.OK:
        message = pgconn.get_error_message()
        raise psycopg.OperationalError(message or "connection lost")
    raise psycopg.errors.error_from_result(result)


def run(
    conn: psycopg.Connection[Any], name: str, params: Mapping[str, object]
) -> list[tuple[Any, ...]]:
    """Run a named query straight through libpq; return its rows.

    Integers come back as int, every other value as its text's UTF-8 bytes
    (the JSON bodies PostgreSQL builds, sent on without decoding them), NULL
    as None. This skips psycopg's cursor: it was a third of the CPU per
    request, and a pooled connection is used by one thread at a time.
    """
    statement = STATEMENTS[name]
    values = [_text(params[key]) for key in statement.params]
    pgconn = conn.pgconn
    if name in UNPREPARED:
        result = _checked(pgconn, pgconn.exec_params(statement.sql, values))
    else:
        result = _exec_prepared(pgconn, statement, values)
    types = [result.ftype(col) for col in range(result.nfields)]
    rows = [
        tuple(_value(result.get_value(row, col), oid) for col, oid in enumerate(types))
        for row in range(result.ntuples)
    ]
    result.clear()  # libpq's copy of a page goes now, not when collected
    return rows


def _exec_prepared(
    pgconn: pq.abc.PGconn, statement: Statement, values: list[bytes | None]
) -> pq.abc.PGresult:
    """Run a prepared statement, preparing it first where the session lacks it
    (a new connection): no lookup per query, and nothing to do while
    connecting, when a lock on the table would hold the connection up."""
    # NULLs are allowed, as in exec_params (psycopg's stub says otherwise).
    result = pgconn.exec_prepared(statement.name, values)  # type: ignore[arg-type]
    if result.error_field(pq.DiagnosticField.SQLSTATE) == UNDEFINED_STATEMENT:
        _checked(pgconn, pgconn.prepare(statement.name, statement.sql))
        result = pgconn.exec_prepared(statement.name, values)  # type: ignore[arg-type]
    return _checked(pgconn, result)


def _value(data: bytes | None, oid: int) -> int | bytes | None:
    """A result value: int for the integer types, else its text as bytes."""
    if data is None:
        return None
    return int(data) if oid in _INTEGER_TYPES else data


def _text(value: object) -> bytes | None:
    """A parameter in libpq's text format (PostgreSQL infers its type)."""
    if value is None:
        return None
    return str(value).encode()


class Pool:
    """A psycopg pool of `size` connections that maps outages to 503, and a
    query cancelled by PostgreSQL past `timeout` seconds to 503 `slow`."""

    def __init__(
        self, conninfo: str, size: int, what: str, timeout: float, slow: str
    ) -> None:
        self.size, self.what, self.slow = size, what, slow
        budget = f"-c statement_timeout={max(1, round(timeout * 1000))}"
        self.pool = ConnectionPool(
            psycopg.conninfo.make_conninfo(conninfo, options=budget),
            min_size=min(2, size),
            max_size=size,
            timeout=DB_WAIT,
            kwargs={"autocommit": True},
            reconnect_timeout=0,  # keep trying forever while the database is down
            open=False,
        )
        self._lent = 0  # connections out of the pool right now
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """Lend a pooled connection; 503 when none comes within DB_WAIT."""
        try:
            conn = self._lend(time.monotonic() + DB_WAIT)
            with self._lock:
                self._lent += 1
            try:
                yield conn
            finally:
                with self._lock:
                    self._lent -= 1
                # Not pool.connection(): its `with conn` ends a transaction,
                # never open here (autocommit), yet costs a wait() while the
                # connection is held, and hold time bounds the pool's rate.
                self.pool.putconn(conn)
        except PoolTimeout:
            if self._lent < self.size:
                log.warning("database unavailable: no connection in %s s", DB_WAIT)
                raise ApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable"
                ) from None
            # Every connection is serving another request: the database is up.
            log.warning("database busy: all %s %s in use", self.size, self.what)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "database busy, try again",
                {"Retry-After": "1"},
            ) from None
        except psycopg.errors.QueryCanceled:
            log.warning("a query on the %s passed its time: %s", self.what, self.slow)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, self.slow, {"Retry-After": "1"}
            ) from None
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s", exc)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable"
            ) from None

    def _lend(self, deadline: float) -> psycopg.Connection[Any]:
        """A pooled connection the server has not closed; PoolTimeout by deadline.

        An idle connection has nothing to read unless the server sent a goodbye
        (a restart, an idle kill): only then pay for a round trip to check it.
        A dead one is closed, so the pool connects anew, and the next is taken
        at once. (psycopg_pool's own check sleeps 1, 2, 4 s between dead ones:
        after a restart, a pool full of them answered 503 for seconds.)
        """
        while True:
            conn = self.pool.getconn(max(deadline - time.monotonic(), 0.001))
            try:
                if select.select([conn.fileno()], [], [], 0)[0]:
                    ConnectionPool.check_connection(conn)
                return conn
            except psycopg.Error:
                conn.close()
                self.pool.putconn(conn)  # closed: dropped, and replaced


class Page(NamedTuple):
    """One page of movies, as the page queries of sql/ build it."""

    text: bytes | None  # the lead and the movies' JSON; None if none was kept
    kept: int  # movies in text
    last: int | None  # the id the next page starts after
    read: int  # movies read, kept or not (kept < read: cut at the budget)


class Database:
    """Runs named queries: single rows on one pool, list pages on another.

    libpq keeps a connection's input buffer as large as the largest result it
    got, so pages (up to PAGE_BYTES each) have connections of their own: the
    many connections that serve single rows stay small.
    """

    def __init__(
        self,
        conninfo: str,
        query_timeout: float = QUERY_TIMEOUT,
        search_timeout: float = SEARCH_TIMEOUT,
    ) -> None:
        slow = "the database took too long, try again"
        self.rows = Pool(conninfo, POOL_SIZE, "connections", query_timeout, slow)
        self.pages_pool = Pool(
            conninfo, PAGE_SLOTS, "page connections", query_timeout, slow
        )
        # A search can cost the database far more than a point read (a title
        # whose trigrams every movie has): searches get a few connections and a
        # shorter budget of their own, below the gateway's wait for inventory.
        self.searches = Pool(
            conninfo,
            SEARCH_SLOTS,
            "search connections",
            search_timeout,
            "the search took too long: try a longer or rarer title",
        )
        self.pools = (self.rows, self.pages_pool, self.searches)

    def open(self) -> None:
        """Start the pools without waiting: requests get 503 until they connect."""
        for pool in self.pools:
            pool.pool.open(wait=False)

    def close(self) -> None:
        """Close every connection."""
        for pool in self.pools:
            pool.pool.close()

    def row(self, name: str, **params: object) -> tuple[Any, ...] | None:
        """Run a named query and return its first row (or None)."""
        with self.rows.connection() as conn:
            rows = run(conn, name, params)
        return rows[0] if rows else None

    def returning(self, name: str, **params: object) -> tuple[Any, ...]:
        """Run a named query that always gives a row (INSERT ... RETURNING)."""
        row = self.row(name, **params)
        if row is None:
            raise RuntimeError("the query gave no row")
        return row

    def one(self, name: str, **params: object) -> Any:
        """Run a named query and return the first column of its first row."""
        row = self.row(name, **params)
        return None if row is None else row[0]

    def pages(
        self, pattern: str | None, offset: int, limit: int | None
    ) -> Iterator[tuple[bytes, bool]]:
        """Yield (JSON bytes, more) pages: all movies, or `limit` of them.

        The first page starts with "[", each next one with ","; the caller
        closes the array. Pages follow by id (keyset), each built on a
        connection back in its pool before the yield (a slow reader holds
        none), each at most STREAM_PAGE movies and PAGE_BYTES of JSON plus one
        movie. A search (on its own pool) or a limited list (on the rows pool),
        mostly short, starts with a page of at most SMALL_PAGE_BYTES; the rest,
        and a whole list, come from the page pool.
        """
        title = ("cut_movies_by_title",) * 2
        query = ("page_movies", "cut_movies") if pattern is None else title
        params = {"pattern": pattern, "after": 0, "offset": offset, "lead": "["}
        small = pattern is not None or limit is not None
        pool = self.searches if pattern else self.rows if small else self.pages_pool
        params["budget"] = SMALL_PAGE_BYTES if small else PAGE_BYTES
        left, rows, held = limit, STREAM_PAGE, b""
        while True:
            params["limit"] = rows if left is None else min(left, rows)
            text, kept, last, read = self._page(pool, query, params)
            if left is not None:
                left -= kept
            more = (kept < read or read == params["limit"]) and left != 0
            # Ask next for what the budget held: neighbours are alike in size.
            rows = kept if kept < read else min(2 * rows, STREAM_PAGE)
            if params["lead"] == "[":
                text = text or b"["
            if more and pool is not self.pages_pool:
                # Held back until the page pool answers: busy, it is a clean 503.
                held, pool = text or b"", self.pages_pool
                rows, params["budget"] = STREAM_PAGE, PAGE_BYTES
            elif text is not None or held:
                yield held + (text or b""), more
                held = b""
            if not more:
                return
            params.update(after=last, offset=0, lead=",")

    def _page(self, pool: Pool, query: tuple[str, str], params: dict[str, Any]) -> Page:
        """One page on a connection of pool: query[0], or query[1] (the same
        page cut where the budget ends) if the page would pass the budget."""
        with pool.connection() as conn:
            page = Page(*run(conn, query[0], params)[0])
            if page.read and not page.kept:
                page = Page(*run(conn, query[1], params)[0])
        return page


# --- Errors and validation ---


def _bad(message: str) -> ApiError:
    """Return a 400 error."""
    return ApiError(HTTPStatus.BAD_REQUEST, message)


def check_text(
    value: object, field: str, limit: int, required: bool, stored: bool = True
) -> str:
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


def validate_movie(
    data: dict[str, Any], partial: bool
) -> tuple[str | None, str | None]:
    """Check a movie body; return (title, description), None where omitted."""
    unknown = sorted(set(data) - {"title", "description"})
    if unknown:
        raise _bad(f"unknown field '{clip(unknown[0])}'")
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


def parse_id(text: str) -> int:
    """Turn a path segment into a movie id: 400 if malformed, 404 if out of range."""
    if not text.isascii() or not text.isdigit():
        raise _bad("movie id must be a positive integer")
    digits = text.lstrip("0")  # int() refuses over 4,300 digits, zeros too
    if len(digits) > 10 or int(digits or "0") > MAX_DB_INT:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {clip(digits, 20)} not found")
    if not digits:
        raise _bad("movie id must be a positive integer")
    return int(digits)


def parse_count(query: dict[str, str], name: str, low: int, high: int) -> int | None:
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


def like_pattern(text: str) -> str:
    """Build an ILIKE pattern matching text literally anywhere in a title."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# --- Handlers ---


def list_movies(req: Request, db: Database) -> Response:
    """GET /api/movies: every movie, or those whose title contains ?title=."""
    query = req.query
    title = query.get("title")
    pattern = None
    if title:
        text = check_text(title, "title", MAX_TITLE, required=False, stored=False)
        pattern = like_pattern(text)
    limit = parse_count(query, "limit", 1, MAX_LIMIT)
    offset = parse_count(query, "offset", 0, MAX_DB_INT) or 0
    pages = db.pages(pattern, offset, limit)
    first, more = next(pages)
    if not more:
        return Response(HTTPStatus.OK, first + b"]", {"Content-Type": JSON})
    return Response(HTTPStatus.OK, _json_array(first, pages), {"Content-Type": JSON})


def _json_array(first: bytes, rest: Iterator[tuple[bytes, bool]]) -> Iterator[bytes]:
    """Yield the pages of one JSON array as they come, then its end."""
    yield first
    for text, _ in rest:
        yield text
    yield b"]"


def read_movie(req: Request, partial: bool) -> tuple[str | None, str | None]:
    """The request's JSON body as a movie: (title, description)."""
    body = req.read_body(MAX_BODY, json_only=True)
    return validate_movie(decode_object(body, "request body"), partial)


def create_movie(req: Request, db: Database) -> Response:
    """POST /api/movies: create a movie from {title, description}."""
    title, description = read_movie(req, partial=False)
    movie_id, body = db.returning(
        "insert_movie", title=title, description=description or ""
    )
    headers = {"Content-Type": JSON, "Location": f"/api/movies/{movie_id}"}
    return Response(HTTPStatus.CREATED, body, headers)


def delete_movies(req: Request, db: Database) -> Response:
    """DELETE /api/movies: remove every movie."""
    count = db.one("delete_all_movies")
    return json_response(
        HTTPStatus.OK, {"message": f"deleted {count} movies", "deleted": count}
    )


def get_movie(req: Request, db: Database, movie_id: str) -> Response:
    """GET /api/movies/<id>."""
    number = parse_id(movie_id)
    body = db.one("get_movie", id=number)
    if body is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {number} not found")
    return Response(HTTPStatus.OK, body, {"Content-Type": JSON})


def update_movie(req: Request, db: Database, movie_id: str) -> Response:
    """PUT /api/movies/<id>: change the fields given, keep the others."""
    number = parse_id(movie_id)
    title, description = read_movie(req, partial=True)
    body = db.one("update_movie", id=number, title=title, description=description)
    if body is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {number} not found")
    return Response(HTTPStatus.OK, body, {"Content-Type": JSON})


def delete_movie(req: Request, db: Database, movie_id: str) -> Response:
    """DELETE /api/movies/<id>."""
    number = parse_id(movie_id)
    if db.one("delete_movie", id=number) is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"movie {number} not found")
    return json_response(
        HTTPStatus.OK, {"message": f"deleted movie {number}", "id": number}
    )


def health(req: Request, db: Database) -> Response:
    """GET /health: 200 when the database answers, else 503."""
    try:
        db.one("ping")
    except ApiError as exc:
        return json_response(
            HTTPStatus.SERVICE_UNAVAILABLE, {"status": "down", "database": exc.message}
        )
    return json_response(HTTPStatus.OK, {"status": "ok", "database": "ok"})


def build_routes(db: Database) -> Router:
    """The route table, each handler given the database."""
    movies, movie = r"/api/movies/?", r"/api/movies/(?P<movie_id>[^/]+)/?"
    return Router(
        [
            ("GET", movies, functools.partial(list_movies, db=db)),
            ("POST", movies, functools.partial(create_movie, db=db)),
            ("DELETE", movies, functools.partial(delete_movies, db=db)),
            ("GET", movie, functools.partial(get_movie, db=db)),
            ("PUT", movie, functools.partial(update_movie, db=db)),
            ("DELETE", movie, functools.partial(delete_movie, db=db)),
            ("GET", r"/health/?", functools.partial(health, db=db)),
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


def float_setting(name: str, default: float) -> float:
    """A number of seconds from 0.001 to 3600 from the environment, else default."""
    text = os.environ.get(name, "").strip() or str(default)
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0.001 <= seconds <= 3600:
        sys.exit(f"{name}={text}: must be a number of seconds from 0.001 to 3600")
    return seconds


def main() -> None:
    """Start the pool and serve until SIGTERM or SIGINT."""
    config = load_config("inventory", REQUIRED)
    setup_logging("inventory", os.environ.get("LOG_LEVEL", "INFO"))
    timeouts = [
        float_setting("INVENTORY_QUERY_TIMEOUT", QUERY_TIMEOUT),
        float_setting("INVENTORY_SEARCH_TIMEOUT", SEARCH_TIMEOUT),
    ]
    db = Database(
        database_conninfo(config, "INVENTORY", "inventory"),
        *timeouts,
    )
    # Bind first: exiting with the pools' threads running can end in a
    # traceback from a pool collected in one of its own threads.
    server = bind_or_exit(Server, "INVENTORY", config, build_routes(db))
    server.per_client = int_setting(
        "MAX_CONNECTIONS_PER_CLIENT", CONNECTIONS_PER_CLIENT
    )
    db.open()
    host, port = server.server_address[:2]
    log.info("inventory listening on http://%s:%s", host, port)
    server.serve_until_signal()
    db.close()
    log.info("inventory stopped")


if __name__ == "__main__":
    main()
