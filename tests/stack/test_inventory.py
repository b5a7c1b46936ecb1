"""Inventory against the real PostgreSQL: every endpoint and every error."""

import concurrent.futures
import time

import helpers
import pytest
from hypothesis import given
from hypothesis import strategies as st

import inventory as inventory_module

JSON = {"Content-Type": "application/json"}


def create(base, title, description="d"):
    status, _, body = helpers.call(
        base, "POST", "/api/movies", {"title": title, "description": description}
    )
    assert status == 201, body
    return body


def test_create_and_get(inventory, clean_movies):
    status, headers, body = helpers.call(
        inventory.url,
        "POST",
        "/api/movies/",
        {"title": "A new movie", "description": "Very short description"},
    )
    assert status == 201
    assert body == {
        "id": body["id"],
        "title": "A new movie",
        "description": "Very short description",
    }
    assert headers["Location"] == f"/api/movies/{body['id']}"
    assert headers["Content-Type"] == "application/json"
    for path in (f"/api/movies/{body['id']}", f"/api/movies/{body['id']}/"):
        assert helpers.call(inventory.url, "GET", path)[::2] == (200, body)
    assert helpers.rows(clean_movies, "SELECT title, description FROM movies") == [
        ("A new movie", "Very short description")
    ]


def test_inventory_loads_one_openssl(inventory, clean_movies):
    # Python's ssl is kept out: libpq's OpenSSL is the only one (bench/HISTORY.md, "Memory").
    create(inventory.url, "t")  # the pool has logged in
    files = helpers.mapped_files(inventory.proc.pid)
    assert len([f for f in files if "/libcrypto" in f]) == 1, files
    assert not any("/_ssl." in f for f in files)


def test_description_defaults_to_empty(inventory, clean_movies):
    status, _, body = helpers.call(
        inventory.url, "POST", "/api/movies", {"title": "Solo"}
    )
    assert status == 201 and body["description"] == ""


def test_list_ordered_by_id(inventory, clean_movies):
    made = [create(inventory.url, f"Movie {i}") for i in range(5)]
    for path in ("/api/movies", "/api/movies/"):
        status, _, body = helpers.call(inventory.url, "GET", path)
        assert status == 200 and body == made


def test_list_empty(inventory, clean_movies):
    assert helpers.call(inventory.url, "GET", "/api/movies")[::2] == (200, [])


def test_limit_and_offset(inventory, clean_movies):
    made = [create(inventory.url, f"Movie {i}") for i in range(5)]
    body = helpers.call(inventory.url, "GET", "/api/movies?limit=2&offset=1")[2]
    assert body == made[1:3]
    for query in ("limit=0", "limit=1001", "limit=x", "offset=-1", "limit=1.5"):
        status, _, body = helpers.call(inventory.url, "GET", f"/api/movies?{query}")
        assert status == 400 and "error" in body, query


def test_search_is_case_insensitive_substring(inventory, clean_movies):
    a = create(inventory.url, "The Matrix")
    b = create(inventory.url, "matrix reloaded")
    create(inventory.url, "Alien")
    body = helpers.call(inventory.url, "GET", "/api/movies?title=MATRIX")[2]
    assert body == [a, b]
    assert helpers.call(inventory.url, "GET", "/api/movies?title=zzz")[2] == []


def test_search_wildcards_match_literally(inventory, clean_movies):
    pct = create(inventory.url, "100% Love")
    under = create(inventory.url, "snake_case")
    slash = create(inventory.url, "back\\slash")
    create(inventory.url, "1000 Loves")
    create(inventory.url, "snakeXcase")
    assert helpers.call(inventory.url, "GET", "/api/movies?title=%25")[2] == [pct]
    assert helpers.call(inventory.url, "GET", "/api/movies?title=e_c")[2] == [under]
    assert helpers.call(inventory.url, "GET", "/api/movies?title=%5C")[2] == [slash]


def test_unicode_round_trips(inventory, clean_movies):
    title = "Amélie 🎬 千と千尋の神隠し"
    movie = create(inventory.url, title, "Ünïcødé ✓")
    assert (
        helpers.call(inventory.url, "GET", f"/api/movies/{movie['id']}")[2]["title"]
        == title
    )
    found = helpers.call(inventory.url, "GET", "/api/movies?title=%E5%8D%83%E3%81%A8")[
        2
    ]
    assert found == [movie]


def test_partial_and_full_update(inventory, clean_movies):
    movie = create(inventory.url, "Old", "old description")
    url = f"/api/movies/{movie['id']}"
    status, _, body = helpers.call(inventory.url, "PUT", url, {"title": "New"})
    assert status == 200 and body == {**movie, "title": "New"}
    status, _, body = helpers.call(
        inventory.url, "PUT", url + "/", {"description": "d2"}
    )
    assert body == {**movie, "title": "New", "description": "d2"}
    status, _, body = helpers.call(
        inventory.url, "PUT", url, {"title": "T", "description": ""}
    )
    assert body == {**movie, "title": "T", "description": ""}
    assert helpers.call(inventory.url, "GET", url)[2] == body


def test_delete_one(inventory, clean_movies):
    movie = create(inventory.url, "Doomed")
    keep = create(inventory.url, "Kept")
    status, _, body = helpers.call(
        inventory.url, "DELETE", f"/api/movies/{movie['id']}/"
    )
    assert status == 200 and body["id"] == movie["id"] and body["message"]
    assert helpers.call(inventory.url, "GET", f"/api/movies/{movie['id']}")[0] == 404
    assert helpers.call(inventory.url, "DELETE", f"/api/movies/{movie['id']}")[0] == 404
    assert helpers.call(inventory.url, "GET", "/api/movies")[2] == [keep]


def test_delete_all(inventory, clean_movies):
    for i in range(3):
        create(inventory.url, f"M{i}")
    status, _, body = helpers.call(inventory.url, "DELETE", "/api/movies/")
    assert status == 200 and body["deleted"] == 3 and body["message"]
    assert helpers.call(inventory.url, "GET", "/api/movies")[2] == []
    assert helpers.call(inventory.url, "DELETE", "/api/movies")[2]["deleted"] == 0


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"title"', "must be a JSON object"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"title": NaN}', "not valid JSON"),
        (b'{"description": "no title"}', "'title' is required"),
        (b'{"title": ""}', "'title'"),
        (b'{"title": "   "}', "'title'"),
        (b'{"title": 42}', "'title'"),
        (b'{"title": null}', "'title'"),
        (b'{"title": "x", "extra": 1}', "'extra'"),
        (b'{"title": "x", "description": 5}', "'description'"),
        (b'{"title": "a\\u0000b"}', "NUL"),
        (b'{"title": "\\ud800"}', "Unicode"),
    ],
)
def test_create_rejects_bad_bodies(inventory, clean_movies, raw, message):
    status, _, body = helpers.call(
        inventory.url, "POST", "/api/movies", raw=raw, headers=JSON
    )
    assert status == 400
    assert message in body["error"]
    assert helpers.rows(clean_movies, "SELECT count(*) FROM movies") == [(0,)]


def test_length_limits(inventory, clean_movies):
    status, _, body = helpers.call(
        inventory.url, "POST", "/api/movies", {"title": "x" * 256}
    )
    assert status == 400 and "title" in body["error"]
    assert create(inventory.url, "x" * 255)["title"] == "x" * 255
    long = {"title": "t", "description": "d" * 10_001}
    assert helpers.call(inventory.url, "POST", "/api/movies", long)[0] == 400
    assert create(inventory.url, "t", "d" * 10_000)["description"] == "d" * 10_000


def test_update_rejects_bad_bodies(inventory, clean_movies):
    movie = create(inventory.url, "Stay")
    url = f"/api/movies/{movie['id']}"
    for body in ({}, {"title": ""}, {"title": None}, {"id": 5}, [1]):
        status, _, answer = helpers.call(inventory.url, "PUT", url, body)
        assert status == 400 and answer["error"], body
    assert helpers.call(inventory.url, "GET", url)[2] == movie


def test_wrong_content_type_is_415(inventory, clean_movies):
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        status, _, body = helpers.call(
            inventory.url,
            "POST",
            "/api/movies",
            raw=b'{"title": "x"}',
            headers={"Content-Type": ctype},
        )
        assert status == 415 and "application/json" in body["error"]
    status, _, _ = helpers.call(
        inventory.url,
        "POST",
        "/api/movies",
        raw=b'{"title": "x"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201


@pytest.mark.parametrize(
    "path, status",
    [
        ("/api/movies/abc", 400),
        ("/api/movies/-1", 400),
        ("/api/movies/0", 400),
        ("/api/movies/1.5", 400),
        ("/api/movies/999999", 404),
        ("/api/movies/2147483648", 404),
        ("/api/movies/99999999999999999999999", 404),
    ],
)
def test_bad_and_unknown_ids(inventory, clean_movies, path, status):
    for method, body in (("GET", None), ("PUT", {"title": "x"}), ("DELETE", None)):
        got, _, answer = helpers.call(inventory.url, method, path, body)
        assert got == status and answer["error"], (method, path)


def test_an_id_after_thousands_of_zeros_is_that_id(inventory, clean_movies):
    # int() refuses over 4,300 digits: the zeros once gave a 500.
    movie = create(inventory.url, "Zeros")
    zeros = "0" * 5000
    for method, body in (("GET", None), ("PUT", {"title": "y"}), ("DELETE", None)):
        path = f"/api/movies/{zeros}{movie['id']}"
        got, _, answer = helpers.call(inventory.url, method, path, body)
        assert got in (200, 204) and answer != {"error": "internal error"}, method
    assert helpers.call(inventory.url, "GET", f"/api/movies/{zeros}")[0] == 400
    got, _, answer = helpers.call(
        inventory.url, "GET", f"/api/movies/{zeros}{'9' * 30}"
    )
    assert got == 404 and len(answer["error"]) < 100


@given(st.integers(0, 6000), st.integers(0, 2**40))
def test_parse_id_reads_leading_zeros_as_nothing(zeros, number):
    text = "0" * zeros + str(number)
    try:
        assert inventory_module.parse_id(text) == number
        assert 1 <= number <= 2**31 - 1
    except inventory_module.ApiError as exc:
        assert exc.status == (400 if number == 0 else 404)
        assert number == 0 or number > 2**31 - 1
        assert len(exc.message) < 100


def test_unknown_path_and_wrong_method(inventory):
    for path in ("/", "/api", "/api/movie", "/api/movies/1/2", "/api/movies/../.."):
        status, _, body = helpers.call(inventory.url, "GET", path)
        assert status == 404 and body["error"], path
    status, headers, body = helpers.call(inventory.url, "PATCH", "/api/movies/1")
    assert status == 405 and headers["Allow"] == "GET, PUT, DELETE"
    status, headers, body = helpers.call(inventory.url, "PUT", "/api/movies")
    assert status == 405 and headers["Allow"] == "GET, POST, DELETE"
    assert body["error"]


def test_concurrent_creates(inventory, clean_movies):
    def make(i):
        return helpers.call(inventory.url, "POST", "/api/movies", {"title": f"C{i}"})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(make, range(400)))
    assert all(status == 201 for status, _, _ in results)
    ids = {body["id"] for _, _, body in results}
    assert len(ids) == 400
    assert helpers.rows(clean_movies, "SELECT count(*) FROM movies") == [(400,)]


def test_database_unreachable_is_503_fast(movies_db):
    port = helpers.free_port()
    service = helpers.Service(
        "inventory", {**helpers.inventory_env(port), "INVENTORY_DB_PORT": "1"}, port
    )
    service.start()
    try:
        start = time.monotonic()
        status, _, body = helpers.call(service.url, "GET", "/api/movies")
        assert status == 503 and body == {"error": "database unavailable"}
        assert time.monotonic() - start < 5
    finally:
        service.stop()


def test_recovers_after_database_restart(inventory, clean_movies):
    movie = create(inventory.url, "Survivor")
    try:
        helpers.pg("stop")
        start = time.monotonic()
        status, _, body = helpers.call(
            inventory.url, "GET", f"/api/movies/{movie['id']}"
        )
        assert status == 503 and body["error"] == "database unavailable"
        assert time.monotonic() - start < 5
    finally:
        helpers.pg("start")
    helpers.wait_for(
        lambda: (
            helpers.call(inventory.url, "GET", f"/api/movies/{movie['id']}")[0] == 200
        ),
        timeout=30,
        what="inventory to recover",
    )
    assert create(inventory.url, "After restart")["title"] == "After restart"


def test_large_list_is_streamed_complete_and_in_order(inventory, clean_movies):
    with helpers.admin_connect(clean_movies) as conn:
        conn.execute(
            "INSERT INTO movies (title, description)"
            " SELECT 'Bulk ' || i, 'd' FROM generate_series(1, 4500) AS i"
        )
    status, headers, body = helpers.call(inventory.url, "GET", "/api/movies")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert [m["id"] for m in body] == list(range(1, 4501))
    assert body[-1] == {"id": 4500, "title": "Bulk 4500", "description": "d"}
    status, _, body = helpers.call(
        inventory.url, "GET", "/api/movies?title=bulk%2045&offset=2"
    )
    expected = [f"Bulk {i}" for i in range(451, 460)] + ["Bulk 4500"]
    assert status == 200 and [m["title"] for m in body] == expected
