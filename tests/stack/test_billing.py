"""Billing against the real RabbitMQ and PostgreSQL."""

import json
import signal
import time
from decimal import Decimal

import helpers
import pytest

import billing as billing_module


@pytest.fixture
def billing(queue, orders_db):
    """A billing consumer on the test queue and empty orders (not started)."""
    service = helpers.Service("billing", helpers.billing_env(queue))
    yield service
    service.stop(signal.SIGKILL)


def order(i, **changes):
    return {"user_id": i, "number_of_items": 1, "total_amount": "9.99", **changes}


def test_backlog_published_while_stopped_is_stored_on_start(billing, queue):
    helpers.publish_raw(
        queue,
        [order(i) for i in range(1, 101)],
        [helpers.message_id(f"m{i}") for i in range(100)],
    )
    assert helpers.queue_depth(queue) == 100
    billing.start()
    helpers.wait_for(lambda: helpers.count_orders() == 100, what="100 orders")
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    assert helpers.rows(
        "billing_test", "SELECT min(user_id), max(user_id) FROM orders"
    ) == [(1, 100)]


def test_numbers_and_numeric_strings_are_stored_right(billing, queue):
    helpers.publish_raw(
        queue,
        [
            {"user_id": "3", "number_of_items": "5", "total_amount": "180"},
            {"user_id": 4, "number_of_items": 6, "total_amount": 19.99},
            {"user_id": "5", "number_of_items": 7, "total_amount": "0.5"},
            '{"user_id": 6, "number_of_items": 8, "total_amount": 12}',
        ],
    )  # no content_type: as published by hand
    billing.start()
    helpers.wait_for(lambda: helpers.count_orders() == 4, what="4 orders")
    assert helpers.rows(
        "billing_test",
        "SELECT user_id, number_of_items, total_amount FROM orders ORDER BY user_id",
    ) == [
        (3, 5, Decimal("180.00")),
        (4, 6, Decimal("19.99")),
        (5, 7, Decimal("0.50")),
        (6, 8, Decimal("12.00")),
    ]


POISON = [
    b"not json",
    b"\xff\xfe garbage",
    b"[1, 2, 3]",
    b'"just a string"',
    b"{}",
    json.dumps(order(1, user_id="abc")).encode(),
    json.dumps(order(1, user_id=-4)).encode(),
    json.dumps(order(1, number_of_items=2**40)).encode(),
    json.dumps(order(1, total_amount="1.999")).encode(),
    json.dumps(order(1, total_amount=10**15)).encode(),
    json.dumps(order(1, total_amount=None)).encode(),
    json.dumps(order(1, note="the gateway refuses unknown fields")).encode(),
    b"[" * 100_000,
]


def test_invalid_messages_are_dead_lettered_and_others_stored(billing, queue):
    bodies = []
    for i, poison in enumerate(POISON):
        bodies += [order(100 + i), poison]
    bodies.append(order(999))
    helpers.publish_raw(queue, bodies)
    billing.start()
    helpers.wait_for(
        lambda: helpers.count_orders() == len(POISON) + 1, what="the good orders"
    )
    helpers.wait_for(
        lambda: helpers.queue_depth(f"{queue}.dead") == len(POISON), what="dead letters"
    )
    assert helpers.queue_depth(queue) == 0
    conn, channel = helpers.rabbit_channel()
    dead = []
    for _ in POISON:
        _, properties, body = channel.basic_get(f"{queue}.dead", auto_ack=True)
        dead.append(body)
        assert properties.headers["x-death"][0]["reason"] == "rejected"
    conn.close()
    assert sorted(dead) == sorted(POISON)
    assert billing.tail(200).count("rejected message") == len(POISON)


def test_same_message_id_is_stored_once(billing, queue):
    dup, other = helpers.message_id("dup"), helpers.message_id("other")
    helpers.publish_raw(queue, [order(7), order(7), order(8)], [dup, dup, other])
    billing.start()
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    time.sleep(0.5)
    helpers.publish_raw(queue, [order(7)], [dup])  # again later, in another batch
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    time.sleep(0.5)
    assert helpers.rows(
        "billing_test", "SELECT message_id FROM orders ORDER BY id"
    ) == [(dup,), (other,)]


def test_each_stored_order_is_logged_on_its_own_line(billing, queue):
    keyed = billing_module.keyed_message_id((5, 1, Decimal("9.99")), 'k"\\x')
    plain = helpers.message_id("plain")
    helpers.publish_raw(queue, [order(5), order(6)], [keyed, plain])
    billing.start()
    helpers.wait_for(lambda: helpers.count_orders() == 2, what="2 orders")
    helpers.wait_for(lambda: plain in billing.tail(), what="the second order's log")
    lines = [line for line in billing.tail().splitlines() if "stored order" in line]
    quoted = keyed.replace("\\", "\\\\").replace('"', '\\"')
    assert lines[0].endswith(
        f'stored order 1: user 5, 1 items, 9.99, message_id "{quoted}"'
    )
    assert lines[1].endswith(
        f'stored order 2: user 6, 1 items, 9.99, message_id "{plain}"'
    )


def test_billing_loads_one_openssl(billing, queue):
    # pika needs Python's ssl; psycopg must share its OpenSSL (system libpq)
    # rather than bring psycopg-binary's second copy (bench/HISTORY.md, "Memory").
    helpers.publish_raw(queue, [order(1)])
    billing.start()
    helpers.wait_for(lambda: helpers.count_orders() == 1, what="the order")
    files = helpers.mapped_files(billing.proc.pid)
    assert len([f for f in files if "/libcrypto" in f]) == 1, files
    assert not any("psycopg_binary" in f for f in files)


def test_kill_9_mid_backlog_loses_and_duplicates_nothing(billing, queue):
    total = 5000
    helpers.publish_raw(
        queue,
        [order(i + 1) for i in range(total)],
        [helpers.message_id(f"k{i}") for i in range(total)],
    )
    billing.start()
    helpers.wait_for(
        lambda: helpers.count_orders() > 0, interval=0.01, what="the first orders"
    )
    billing.stop(signal.SIGKILL)
    stored_at_kill = helpers.count_orders()
    billing.start()
    helpers.wait_for(lambda: helpers.count_orders() == total, what=f"{total} orders")
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    assert helpers.rows(
        "billing_test", "SELECT count(DISTINCT message_id) FROM orders"
    ) == [(total,)]
    print(f"killed with {stored_at_kill} of {total} stored; {total} rows after restart")


def test_database_outage_mid_stream_loses_nothing(billing, queue):
    billing.start()
    helpers.publish_raw(
        queue,
        [order(i + 1) for i in range(200)],
        [helpers.message_id(f"a{i}") for i in range(200)],
    )
    helpers.wait_for(lambda: helpers.count_orders() == 200, what="the first 200 orders")
    try:
        helpers.pg("stop")
        helpers.publish_raw(
            queue,
            [order(i + 1) for i in range(200, 500)],
            [helpers.message_id(f"a{i}") for i in range(200, 500)],
        )
        time.sleep(3)  # billing retries meanwhile, acking nothing
        assert billing.proc.poll() is None
    finally:
        helpers.pg("start")
    helpers.wait_for(
        lambda: helpers.count_orders() == 500, timeout=30, what="all 500 orders"
    )
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    assert helpers.queue_depth(f"{queue}.dead") == 0
    assert "database unavailable" in billing.tail(400)


def test_sigterm_exits_cleanly(billing, queue):
    helpers.publish_raw(
        queue,
        [order(i + 1) for i in range(3000)],
        [helpers.message_id(f"t{i}") for i in range(3000)],
    )
    billing.start()
    helpers.wait_for(
        lambda: helpers.count_orders() > 0, interval=0.01, what="the first orders"
    )
    start = time.monotonic()
    assert billing.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 5
    stored = helpers.count_orders()
    # every message stored or still queued
    assert stored + helpers.queue_depth(queue) == 3000
    assert "billing stopped" in billing.tail()


@pytest.fixture
def consumer(gateway, queue_name, billing_db):
    """A billing consumer behind the session's gateway, on empty orders."""
    with helpers.admin_connect(billing_db) as conn:
        conn.execute("TRUNCATE orders RESTART IDENTITY")
    conn, channel = helpers.rabbit_channel()
    channel.queue_purge(queue_name)  # left over by other tests
    conn.close()
    service = helpers.Service("billing", helpers.billing_env(queue_name)).start()
    yield service
    assert service.stop() == 0


def test_end_to_end_through_gateway(gateway, consumer):
    for user in (20, 22):
        body = {
            "user_id": str(user),
            "number_of_items": "99",
            "total_amount": "250",
        }
        assert helpers.call(gateway.url, "POST", "/api/billing/", body)[0] == 200
    helpers.wait_for(lambda: helpers.count_orders() == 2, what="both orders")
    assert helpers.rows(
        "billing_test", "SELECT user_id, total_amount FROM orders ORDER BY user_id"
    ) == [(20, Decimal("250.00")), (22, Decimal("250.00"))]


def test_retries_with_one_idempotency_key_are_stored_once(
    gateway, queue_name, consumer
):
    attempts = [(20, "k1"), (20, "k1"), (20, "k1"), (21, "k1"), (20, "k2")]
    for user, key in attempts:
        body = {"user_id": user, "number_of_items": 1, "total_amount": "5"}
        headers = {"Idempotency-Key": key}
        assert (
            helpers.call(gateway.url, "POST", "/api/billing", body, headers)[0] == 200
        )
    assert helpers.call(gateway.url, "POST", "/api/billing", body)[0] == 200  # no key
    helpers.wait_for(
        lambda: helpers.queue_depth(queue_name) == 0, what="the queue to empty"
    )
    helpers.wait_for(lambda: helpers.count_orders() == 4, what="4 orders")
    time.sleep(0.5)  # nothing more arrives
    stored = helpers.rows(
        "billing_test", "SELECT user_id, message_id FROM orders ORDER BY id"
    )
    five = Decimal("5.00")
    assert stored[:3] == [
        (20, billing_module.keyed_message_id((20, 1, five), "k1")),
        (21, billing_module.keyed_message_id((21, 1, five), "k1")),
        (20, billing_module.keyed_message_id((20, 1, five), "k2")),
    ]
    # the order sent without a key
    assert len(stored) == 4 and stored[3][1] not in {m for _, m in stored[:3]}


def test_a_key_reused_for_another_order_never_drops_that_order(gateway, consumer):
    # Nothing authenticates user_id: a third party can send an order with the
    # victim's user id and Idempotency-Key first. The victim's own order (other
    # items, other amount) must still be stored, under a message id of its own;
    # the same order sent again with the key is still stored once.
    key = {"Idempotency-Key": "victim-key"}
    first = {"user_id": "30", "number_of_items": "1", "total_amount": "0"}
    victim = {"user_id": "30", "number_of_items": "3", "total_amount": "42.50"}
    same_as_victim = {"user_id": 30, "number_of_items": 3, "total_amount": 42.5}
    answers = [
        helpers.call(gateway.url, "POST", "/api/billing", body, key)
        for body in (first, victim, victim, same_as_victim)
    ]
    assert [a[0] for a in answers] == [200] * 4
    ids = [a[1]["X-Message-Id"] for a in answers]
    assert ids[0] != ids[1] and ids[1] == ids[2] == ids[3]
    helpers.wait_for(lambda: helpers.count_orders() == 2, what="both orders")
    time.sleep(0.5)  # the retries add nothing
    assert helpers.rows(
        "billing_test",
        "SELECT user_id, number_of_items, total_amount FROM orders ORDER BY id",
    ) == [(30, 1, Decimal("0.00")), (30, 3, Decimal("42.50"))]


FORGED_IDS = [
    None,  # published by hand, no id: stored twice if sent twice
    "dup",
    "A" * 32,  # upper-case hex is not what the gateway writes
    "key:31:0000000000000000:k",  # a digest that is not this order's
    billing_module.keyed_message_id((32, 1, Decimal("9.99")), "k"),  # another user's
    billing_module.keyed_message_id((31, 2, Decimal("9.99")), "k"),  # other items
]


def test_messages_without_a_gateway_message_id_are_dead_lettered(billing, queue):
    good = billing_module.keyed_message_id((31, 1, Decimal("9.99")), "k")
    helpers.publish_raw(queue, [order(31)] * (len(FORGED_IDS) + 1), [*FORGED_IDS, good])
    billing.start()
    helpers.wait_for(
        lambda: helpers.queue_depth(f"{queue}.dead") == len(FORGED_IDS),
        what="the forged messages dead-lettered",
    )
    helpers.wait_for(lambda: helpers.count_orders() == 1, what="the real order")
    assert helpers.rows("billing_test", "SELECT message_id FROM orders") == [(good,)]
    assert billing.tail(200).count("message id not one the gateway gives") == len(
        FORGED_IDS
    )
