"""Pure parts of the services, tested without any server."""

import concurrent.futures
import types
from decimal import Decimal
from pathlib import Path

import pika
import pytest

import billing
import gateway
import inventory

ROOT = Path(__file__).resolve().parents[2]


def test_queries_load_by_name():
    assert set(inventory.QUERIES) == {
        "page_movies",
        "cut_movies",
        "cut_movies_by_title",
        "get_movie",
        "insert_movie",
        "update_movie",
        "delete_movie",
        "delete_all_movies",
        "ping",
    }
    assert set(billing.QUERIES) == {"insert_orders", "lock_message_ids"}
    assert all(
        "%(" in sql or "DELETE" in sql or name == "ping"  # ping: SELECT 1
        for name, sql in inventory.QUERIES.items()
    )


def test_like_pattern_escapes_wildcards():
    assert inventory.like_pattern("a%b_c\\d") == "%a\\%b\\_c\\\\d%"


@pytest.mark.parametrize(
    "text, status",
    [
        ("abc", 400),
        ("-1", 400),
        ("0", 400),
        ("1.5", 400),
        ("\uff11", 400),  # a fullwidth digit
        ("2147483648", 404),
        ("9" * 5000, 404),
    ],
)
def test_parse_id_rejects(text, status):
    with pytest.raises(inventory.ApiError) as err:
        inventory.parse_id(text)
    assert err.value.status == status


def test_parse_id_accepts():
    assert inventory.parse_id("42") == 42
    assert inventory.parse_id("2147483647") == 2**31 - 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "'title' is required"),
        ({"title": " "}, "'title' must not be empty"),
        ({"title": 5}, "'title' must be a string"),
        ({"title": "x" * 256}, "at most 255"),
        ({"title": "t", "description": 1}, "'description' must be a string"),
        ({"title": "t", "description": "d" * 10_001}, "at most 10000"),
        ({"title": "t", "rating": 5}, "unknown field 'rating'"),
        ({"title": "a\x00b"}, "NUL"),
        ({"title": "\ud800"}, "Unicode"),
    ],
)
def test_validate_movie_rejects(data, message):
    with pytest.raises(inventory.ApiError) as err:
        inventory.validate_movie(data, partial=False)
    assert message in err.value.message


def test_validate_movie_partial():
    assert inventory.validate_movie({"description": "d"}, partial=True) == (None, "d")
    with pytest.raises(inventory.ApiError):
        inventory.validate_movie({}, partial=True)


GOOD_ORDERS = [
    {"user_id": "20", "number_of_items": "99", "total_amount": "250"},
    {"user_id": 3, "number_of_items": 5, "total_amount": 180},
    {"user_id": 3, "number_of_items": 5, "total_amount": Decimal("19.99")},
    {"user_id": "3", "number_of_items": "5", "total_amount": "19.90"},
    {"user_id": 1, "number_of_items": 1, "total_amount": "0"},
]
BAD_ORDERS = [
    ({"number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": 0, "number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": -1, "number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": True, "number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": "1.5", "number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": 2**31, "number_of_items": 1, "total_amount": 1}, "user_id"),
    ({"user_id": 1, "number_of_items": "x", "total_amount": 1}, "number_of_items"),
    ({"user_id": 1, "number_of_items": None, "total_amount": 1}, "number_of_items"),
    ({"user_id": 1, "number_of_items": 1, "total_amount": "1.234"}, "total_amount"),
    ({"user_id": 1, "number_of_items": 1, "total_amount": -1}, "total_amount"),
    ({"user_id": 1, "number_of_items": 1, "total_amount": "1e3"}, "total_amount"),
    ({"user_id": 1, "number_of_items": 1, "total_amount": 10**10}, "total_amount"),
    ({"user_id": 1, "number_of_items": 1, "total_amount": [1]}, "total_amount"),
]


@pytest.mark.parametrize("order", GOOD_ORDERS)
def test_orders_accepted_by_gateway_and_billing(order):
    gateway.validate_order(order)
    text = gateway.json.dumps(order, default=str)
    assert billing.parse_order(text.encode())[0] == int(order["user_id"])


@pytest.mark.parametrize("order, field", BAD_ORDERS)
def test_orders_rejected_by_gateway_and_billing(order, field):
    with pytest.raises(gateway.ApiError) as err:
        gateway.validate_order(order)
    assert field in err.value.message
    with pytest.raises(billing.InvalidOrder):
        billing.parse_order(gateway.json.dumps(order).encode())


def test_gateway_rejects_unknown_order_field():
    with pytest.raises(gateway.ApiError) as err:
        gateway.validate_order({**GOOD_ORDERS[0], "coupon": "x"})
    assert "coupon" in err.value.message


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'"x"', b"\xff\xfe", b"[" * 100_000, b"NaN"]
)
def test_billing_rejects_non_objects(body):
    with pytest.raises(billing.InvalidOrder):
        billing.parse_order(body)


def test_queue_arguments_match():
    assert gateway.queue_arguments("q") == billing.queue_arguments("q")


def test_routes_match_trailing_slash():
    routes = inventory.build_routes(db=None)
    paths = ["/api/movies", "/api/movies/", "/api/movies/7", "/api/movies/7/"]
    for path in paths:
        assert routes.match("GET", path)
    with pytest.raises(inventory.ApiError) as refused:
        routes.match("GET", "/api/movies/7/x")
    assert refused.value.status == 404


def test_publisher_fails_every_returned_publish_of_one_message_id():
    # Two publishes share a message id (one Idempotency-Key); RabbitMQ returns
    # both (already published again after declaring the queue), then acks them
    # together: neither may be reported as stored.
    confirms = gateway._Confirms("q")
    futures = [concurrent.futures.Future() for _ in range(3)]
    properties = pika.BasicProperties(message_id="key:1:k")
    confirms._pending = {
        tag: gateway._Outgoing(future, b"{}", pika.BasicProperties(message_id=mid))
        for tag, future, mid in zip(
            (1, 2, 3), futures, ("key:1:k", "key:1:k", "o"), strict=True
        )
    }
    for outgoing in confirms._pending.values():
        outgoing.retried = True
    for _ in range(2):
        confirms.on_return(None, None, properties, b"{}")
    ack = types.SimpleNamespace(method=pika.spec.Basic.Ack(3, multiple=True))
    confirms.settle(ack)
    assert [type(f.exception()) for f in futures[:2]] == [ConnectionError] * 2
    assert futures[2].result() is None
