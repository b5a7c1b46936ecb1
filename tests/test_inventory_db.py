"""Inventory's named queries straight through libpq: inventory.run and its parts.

Issue 17 replaced psycopg's cursor with to_statement ($1..$n by first
appearance), statements prepared on first use (again after SQLSTATE 26000),
errors mapped as psycopg maps them and values read as int or bytes. These tests
check each part on its own, against movies_test as the service's role, through
HTTP, and with the table locked while an inventory starts. The last test is an
expected failure: a list waits for one of PAGE_SLOTS with no timeout.
"""

import concurrent.futures
import json
import os
import re
import socket
import time
import urllib.parse

import helpers
import psycopg
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from psycopg import pq

import inventory

JSON = {"Content-Type": "application/json"}
PLACEHOLDER = re.compile(r"%\((\w+)\)s")
NUMBERED = re.compile(r"\$(\d+)")
PAGE = {"after": 0, "offset": 0, "lead": "[", "budget": 1024 * 1024, "limit": 10}


def body_of(sql):
    """A query's SQL without its comments (what PostgreSQL parses)."""
    return re.sub(r"--[^\n]*", "", sql)


# --- to_statement: pure ---


def test_a_name_used_twice_gets_one_number():
    statement = inventory.to_statement(
        "q", "SELECT %(a)s, %(b)s WHERE x = %(a)s OR y = %(b)s OR z = %(a)s"
    )
    assert statement == (
        b"q",
        b"SELECT $1, $2 WHERE x = $1 OR y = $2 OR z = $1",
        ("a", "b"),
    )


def test_numbers_follow_first_appearance():
    statement = inventory.to_statement(
        "q", "SELECT %(zeta)s, %(alpha)s, %(mid)s, %(zeta)s"
    )
    assert statement.params == ("zeta", "alpha", "mid")
    assert statement.sql == b"SELECT $1, $2, $3, $1"
    assert inventory.to_statement("q", "SELECT 1").params == ()


@pytest.mark.parametrize("name", sorted(inventory.QUERIES))
def test_every_named_query_converts(name):
    # Every placeholder becomes a number; the numbers the SQL (comments aside)
    # uses are exactly 1..n, one per parameter, so PostgreSQL counts n too.
    statement = inventory.STATEMENTS[name]
    sql = statement.sql.decode()
    assert statement == inventory.to_statement(name, inventory.QUERIES[name])
    assert statement.name == name.encode()
    assert "%(" not in sql and "%%" not in sql
    assert len(set(statement.params)) == len(statement.params)
    used = {int(n) for n in NUMBERED.findall(body_of(sql))}
    assert used == set(range(1, len(statement.params) + 1)), sql
    assert set(PLACEHOLDER.findall(body_of(inventory.QUERIES[name]))) == set(
        statement.params
    )


NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
# SQL between placeholders: no digit (a `$1` then `0` would read as `$10`),
# no `%` and no `$`.
FILLER = st.text(alphabet=" ,()=<>+-*/'\"\nabcxyz:", max_size=6)


@st.composite
def templates(draw):
    """(SQL with %(name)s placeholders, the names in the order used)."""
    names = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    uses = draw(st.lists(st.sampled_from(names), min_size=1, max_size=15))
    parts = [draw(FILLER)]
    for used in uses:
        parts += [f"%({used})s", draw(FILLER)]
    return "".join(parts), uses


@settings(max_examples=300, deadline=None)
@given(templates())
def test_to_statement_numbers_by_first_appearance(template):
    sql, uses = template
    statement = inventory.to_statement("generated", sql)
    order = tuple(dict.fromkeys(uses))
    assert statement.params == order
    numbers = [int(n) for n in NUMBERED.findall(statement.sql.decode())]
    assert numbers == [order.index(name) + 1 for name in uses]
    # Putting each parameter's name back where its number is gives the template.
    back = NUMBERED.sub(
        lambda m: f"%({statement.params[int(m[1]) - 1]})s", statement.sql.decode()
    )
    assert back == sql


# --- run: against movies_test as the service's role ---


@pytest.fixture
def conn(clean_movies):
    """A connection as inventory makes them: the service's role, autocommit."""
    with psycopg.connect(
        host="127.0.0.1",
        port=helpers.ENV["INVENTORY_DB_PORT"],
        dbname=clean_movies,
        user=helpers.ENV["INVENTORY_DB_USER"],
        password=helpers.ENV["INVENTORY_DB_PASSWORD"],
        sslmode="disable",
        autocommit=True,
    ) as conn:
        yield conn


def prepared(conn):
    """Names of the statements the session holds."""
    found = conn.execute("SELECT name FROM pg_prepared_statements").fetchall()
    return {name for (name,) in found}


def insert(conn, title="T", description="D"):
    """Insert a movie with run; return (id, JSON bytes)."""
    [(movie_id, body)] = inventory.run(
        conn, "insert_movie", {"title": title, "description": description}
    )
    return movie_id, body


@pytest.mark.parametrize("name", sorted(set(inventory.QUERIES) - inventory.UNPREPARED))
def test_postgresql_counts_the_parameters_run_sends(conn, name):
    statement = inventory.STATEMENTS[name]
    result = conn.pgconn.prepare(b"counted", statement.sql)
    assert result.status == pq.ExecStatus.COMMAND_OK, result.error_message
    described = conn.pgconn.describe_prepared(b"counted")
    assert described.nparams == len(statement.params)


def test_run_gives_integers_as_int_and_text_as_bytes(conn):
    movie_id, body = insert(conn, "Title", "Description")
    assert type(movie_id) is int and type(body) is bytes
    assert json.loads(body) == {
        "id": movie_id,
        "title": "Title",
        "description": "Description",
    }
    assert inventory.run(conn, "get_movie", {"id": movie_id}) == [(body,)]
    assert inventory.run(conn, "get_movie", {"id": movie_id + 1}) == []
    assert inventory.run(conn, "ping", {}) == [(1,)]
    second, _ = insert(conn, "Other")
    for name, params in (
        ("page_movies", PAGE),
        ("cut_movies", PAGE),
        ("cut_movies_by_title", {**PAGE, "pattern": "%t%"}),  # unprepared
    ):
        [(text, kept, last, read)] = inventory.run(conn, name, params)
        assert type(text) is bytes, name
        assert [type(kept), type(last), type(read)] == [int] * 3, name
        assert (kept, last, read) == (2, second, 2), name
        assert [m["id"] for m in json.loads(text + b"]")] == [movie_id, second]
    empty = inventory.run(conn, "page_movies", {**PAGE, "after": second})
    assert empty == [(None, 0, None, 0)]
    assert inventory.run(conn, "delete_movie", {"id": second}) == [(second,)]
    assert inventory.run(conn, "delete_all_movies", {}) == [(1,)]


def test_null_parameters_keep_the_stored_values(conn, clean_movies):
    movie_id, _ = insert(conn, "Kept title", "old")
    [(body,)] = inventory.run(
        conn, "update_movie", {"id": movie_id, "title": None, "description": "new"}
    )
    assert json.loads(body) == {
        "id": movie_id,
        "title": "Kept title",
        "description": "new",
    }
    [(body,)] = inventory.run(
        conn, "update_movie", {"id": movie_id, "title": "New", "description": None}
    )
    assert json.loads(body) == {"id": movie_id, "title": "New", "description": "new"}
    assert helpers.rows(clean_movies, "SELECT title, description FROM movies") == [
        ("New", "new")
    ]


@pytest.mark.parametrize(
    ("name", "params", "error"),
    [
        (
            "insert_movie",
            {"title": None, "description": ""},
            psycopg.errors.NotNullViolation,
        ),
        ("get_movie", {"id": "x"}, psycopg.errors.InvalidTextRepresentation),
        ("get_movie", {"id": 2**70}, psycopg.errors.NumericValueOutOfRange),
        (
            "cut_movies_by_title",
            {**PAGE, "pattern": "%", "after": "x"},
            psycopg.errors.InvalidTextRepresentation,
        ),
    ],
)
def test_sql_errors_are_psycopg_errors_by_sqlstate(conn, name, params, error):
    # The first time on a fresh connection (prepared just now) and once more.
    for _ in range(2):
        with pytest.raises(psycopg.Error) as caught:
            inventory.run(conn, name, params)
        assert type(caught.value) is error
        assert caught.value.sqlstate == error.sqlstate
        assert caught.value.diag.message_primary
        assert conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
        assert inventory.run(conn, "ping", {}) == [(1,)]


@pytest.mark.parametrize(
    "forget", ["DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE get_movie"]
)
def test_run_prepares_again_after_the_session_forgets(conn, forget):
    movie_id, body = insert(conn)
    assert inventory.run(conn, "get_movie", {"id": movie_id}) == [(body,)]
    assert {"get_movie", "insert_movie"} <= prepared(conn)
    conn.execute(forget)
    assert "get_movie" not in prepared(conn)
    assert inventory.run(conn, "get_movie", {"id": movie_id}) == [(body,)]
    assert "get_movie" in prepared(conn)
    assert insert(conn, "Again")[0] == movie_id + 1


def terminate(conn, dbname):
    """End conn's backend from an admin connection (it says goodbye: 57P01)."""
    with helpers.admin_connect(dbname) as admin:
        gone = admin.execute(
            "SELECT pg_terminate_backend(%s, 5000)", [conn.info.backend_pid]
        ).fetchone()
    assert gone == (True,)


def cut(conn, dbname):
    """Shut conn's socket down under libpq: lost with no word from the server."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("end", [terminate, cut])
@pytest.mark.parametrize("name", ["ping", "get_movie", "cut_movies_by_title"])
def test_a_lost_connection_is_an_operational_error(conn, clean_movies, name, end):
    params = {"id": 1, **PAGE, "pattern": "%"}
    inventory.run(conn, "ping", {})  # prepared before, for ping
    end(conn, clean_movies)
    with pytest.raises(psycopg.OperationalError):
        inventory.run(conn, name, params)
    assert conn.closed  # so the pool throws it away


# --- Through HTTP ---

FORBIDDEN = "".join(chr(c) for c in range(32) if chr(c) not in "\t\n\r")
CHARACTER = st.characters(blacklist_categories=("Cs",), blacklist_characters=FORBIDDEN)
PIECE = CHARACTER | st.sampled_from(
    [
        '"',
        "\\",
        "'",
        "\\u0041",
        "\t",
        "\n",
        "\r\n",
        "%",
        "_",
        "$1",
        "%(title)s",
        "\x7f",
        "\x85",
        "\u2028",
        "\ufeff",
        "\U0001f3ac",
        "\U0001d11e",
        "\U0010ffff",
    ]
)


def texts(min_size, max_size):
    return st.lists(PIECE, min_size=min_size, max_size=max_size).map("".join)


TITLES = texts(1, 40).filter(lambda t: t.strip() and len(t) <= inventory.MAX_TITLE)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(title=TITLES, description=texts(0, 60), ascii_only=st.booleans())
def test_movie_text_round_trips_through_http(
    inventory, clean_movies, title, description, ascii_only
):
    movie = {"title": title, "description": description}
    raw = json.dumps(movie, ensure_ascii=ascii_only).encode()
    status, _, created = helpers.call(
        inventory.url, "POST", "/api/movies", headers=JSON, raw=raw
    )
    assert status == 201, created
    assert created == {"id": created["id"], **movie}
    status, _, got = helpers.call(inventory.url, "GET", f"/api/movies/{created['id']}")
    assert status == 200 and got == created
    for field in ("title", "description"):
        assert got[field].encode() == movie[field].encode()
    assert helpers.rows(
        clean_movies,
        "SELECT title, description FROM movies WHERE id = %s",
        [created["id"]],
    ) == [(title, description)]
    search = "/api/movies?title=" + urllib.parse.quote(title, safe="")
    status, _, found = helpers.call(inventory.url, "GET", search)
    assert status == 200 and created in found


def test_put_with_one_field_keeps_the_other(inventory, clean_movies):
    movie = {"title": 'Kept \U0001f3ac "title"', "description": "old\\one"}
    created = helpers.call(inventory.url, "POST", "/api/movies", movie)[2]
    path = f"/api/movies/{created['id']}"
    status, _, body = helpers.call(inventory.url, "PUT", path, {"description": "new"})
    assert status == 200 and body == {**created, "description": "new"}
    status, _, body = helpers.call(inventory.url, "PUT", path, {"title": "T2"})
    assert status == 200 and body == {**created, "title": "T2", "description": "new"}
    assert helpers.call(inventory.url, "GET", path)[::2] == (200, body)
    assert helpers.rows(clean_movies, "SELECT title, description FROM movies") == [
        ("T2", "new")
    ]


# --- A locked table while an inventory starts ---


def waiting_on_locks(dbname):
    """Backends of dbname waiting for a lock."""
    found = helpers.rows(
        dbname,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND wait_event_type = 'Lock'",
        [dbname],
    )
    return found[0][0]


def test_a_locked_table_holds_requests_not_the_pool(clean_movies):
    movie = {"title": "Locked", "description": "d"}
    [(movie_id,)] = helpers.rows(
        clean_movies,
        "INSERT INTO movies (title, description) VALUES (%s, %s) RETURNING id",
        [movie["title"], movie["description"]],
    )
    movie = {"id": movie_id, **movie}
    path = f"/api/movies/{movie_id}"
    held_calls = [
        ("GET", path, None),
        ("GET", path, None),
        ("GET", path, None),
        ("GET", "/api/movies", None),
        ("GET", "/api/movies", None),
        ("GET", "/api/movies?title=lock", None),
        ("PUT", path, {"description": "after"}),
    ]
    port = helpers.free_port()
    service = helpers.Service("inventory", helpers.inventory_env(port), port)
    try:
        hold_and_release(service, clean_movies, held_calls, movie)
    finally:
        service.stop()


def hold_and_release(service, dbname, held_calls, movie):
    """Start service with the table locked; check what is held, then release."""
    path = f"/api/movies/{movie['id']}"
    with (
        helpers.admin_connect(dbname) as admin,
        concurrent.futures.ThreadPoolExecutor(len(held_calls)) as pool,
    ):
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE movies IN ACCESS EXCLUSIVE MODE")
        try:
            service.start()
            # The pool connects (and /health queries) with the table locked.
            helpers.wait_for(
                lambda: helpers.call(service.url, "GET", "/health")[0] == 200,
                timeout=10,
                what="a fresh inventory's /health to answer 200 under the lock",
            )
            held = [
                pool.submit(helpers.call, service.url, method, p, body)
                for method, p, body in held_calls
            ]
            helpers.wait_for(
                lambda: waiting_on_locks(dbname) >= len(held_calls),
                timeout=10,
                what="every held request to wait for the lock",
            )
            assert not any(f.done() for f in held)
            # More connections still open while those wait.
            assert helpers.call(service.url, "GET", "/health")[0] == 200
            started = time.monotonic()
        finally:
            admin.execute("ROLLBACK")
        answers = [f.result(timeout=10) for f in held]
        assert time.monotonic() - started < 5
        assert [a[0] for a in answers] == [200] * len(held_calls), answers
        after = {**movie, "description": "after"}
        for (method, p, _), (_, _, body) in zip(held_calls, answers, strict=True):
            if method == "PUT":
                assert body == after
            elif p == path:
                assert body in (movie, after)
            else:
                assert body in ([movie], [after])
        assert helpers.call(service.url, "GET", path)[::2] == (200, after)


DB_WAIT = inventory.DB_WAIT
PAGE_SLOTS = inventory.PAGE_SLOTS


def test_a_list_waits_for_a_page_slot_no_longer_than_for_a_connection(
    inventory, clean_movies
):
    # Lists held by a lock keep every page slot; one more list must still be
    # answered (a 503 busy, as for a connection) within DB_WAIT, not hang.
    helpers.rows(clean_movies, "INSERT INTO movies (title) VALUES ('x') RETURNING id")
    with (
        helpers.admin_connect(clean_movies) as admin,
        concurrent.futures.ThreadPoolExecutor(PAGE_SLOTS + 1) as pool,
    ):
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE movies IN ACCESS EXCLUSIVE MODE")
        try:
            held = [
                pool.submit(helpers.call, inventory.url, "GET", "/api/movies")
                for _ in range(PAGE_SLOTS)
            ]
            helpers.wait_for(
                lambda: waiting_on_locks(clean_movies) >= PAGE_SLOTS,
                timeout=10,
                what="the held lists to wait for the lock",
            )
            extra = pool.submit(helpers.timed_call, inventory, "GET", "/api/movies")
            done, _ = concurrent.futures.wait([extra], timeout=DB_WAIT + 2)
            assert helpers.call(inventory.url, "GET", "/health")[0] == 200
        finally:
            admin.execute("ROLLBACK")
        assert [f.result(timeout=10)[0] for f in held] == [200] * PAGE_SLOTS
        status, answer, seconds = extra.result(timeout=10)
    assert extra in done, f"answered {status} only after the lock went"
    assert status == 503 and seconds < DB_WAIT + 1, (status, answer, seconds)
