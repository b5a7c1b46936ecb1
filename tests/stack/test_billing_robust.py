"""Billing never crashes, never loops and never stores an order twice.

Property tests of the parser (any bytes, any JSON value), the ack bookkeeping,
database errors that are not the message's fault, a message that kills billing
whatever the reason, the bigint migration, and a generative consumer test with
random batches and random kill -9.
"""

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from decimal import Decimal

import helpers
import psycopg
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import billing

WEIRD_NUMBERS = [
    "1e1000000000000000000",
    "1e-1000000000000000000",
    "-1e1000000000000000000",
    "1E+999999999999999999",
    "1e999999999",
    "1e-999999999",
    "0e1000000000000000000",
    "-0",
    "-0.0",
    "0.0e0",
    "1.5e1",
    "19.99",
    "1e2",
    "9" * 5000,
    "9" * 4300,
    "0." + "0" * 5000 + "1",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" * 30 + "e-20",
    # Amounts equal to a two-decimal value, written with a scale PostgreSQL's
    # numeric refuses (over 16383 digits after the point): stored as that value.
    "1." + "0" * 16384,
    "0e-16384",
    "0E-999999999",
    "0.0e-32768",
    "5" + "0" * 16390 + "e-16390",
]
HUGE_SCALES = WEIRD_NUMBERS[-5:]
NUMBER_TEXT = st.one_of(
    st.sampled_from(WEIRD_NUMBERS),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(
        r"-?[0-9]{1,30}(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,25})?", fullmatch=True
    ),
)
FIELD_VALUE = st.one_of(
    NUMBER_TEXT.map(lambda text: ("raw", text)),
    NUMBER_TEXT.map(lambda text: ("str", text)),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    ).map(lambda value: ("json", value)),
)


def render(value):
    """JSON text for a field value: a raw number literal, a string or any JSON."""
    kind, inner = value
    if kind == "raw":
        return inner
    return json.dumps(inner)


@st.composite
def order_texts(draw):
    """JSON objects shaped like orders, with any value in any field."""
    fields = {}
    for name in ("user_id", "number_of_items", "total_amount", "extra"):
        if draw(st.integers(0, 9)):  # usually present
            fields[name] = render(draw(FIELD_VALUE))
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


def outcome(body):
    """billing's verdict on a body: ("order", values) or ("dead", reason)."""
    try:
        return "order", billing.parse_order(body)
    except billing.InvalidOrder as exc:
        assert str(exc), "a dead-letter reason must say something"
        return "dead", str(exc)


def assert_storable(values):
    """An accepted order fits the table: the columns' types and checks."""
    user_id, items, amount = values
    assert type(user_id) is int and 1 <= user_id <= 2**31 - 1
    assert type(items) is int and 1 <= items <= 2**31 - 1
    assert isinstance(amount, Decimal) and amount.is_finite()
    assert 0 <= amount <= Decimal("9999999999.99")
    assert amount.as_tuple().exponent == -2  # as numeric(12, 2) stores it


# --- 1. The parser, on anything ---


@pytest.mark.parametrize("number", WEIRD_NUMBERS)
def test_weird_numbers_are_an_order_or_a_reason(number):
    for field in ("user_id", "number_of_items", "total_amount"):
        fields = {"user_id": "1", "number_of_items": "1", "total_amount": "1"}
        for text in (number, json.dumps(number)):
            fields[field] = text
            body = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
            verdict, values = outcome(body.encode())
            if verdict == "order":
                assert_storable(values)


@pytest.mark.parametrize("number", HUGE_SCALES, ids=lambda n: n[:12])
def test_an_amount_with_a_huge_scale_is_stored_as_its_value(billing_db, number):
    body = f'{{"user_id": 1, "number_of_items": 1, "total_amount": {number}}}'
    verdict, values = outcome(body.encode())
    assert verdict == "order"
    with (
        helpers.admin_connect(billing_db) as conn,
        conn.transaction(force_rollback=True),
    ):
        row = conn.execute(
            billing.QUERIES["insert_orders"],
            {
                "user_ids": [1],
                "numbers_of_items": [1],
                "total_amounts": [values[2]],
                "message_ids": ["huge-scale"],
            },
        ).fetchone()
        stored = conn.execute(
            "SELECT total_amount FROM orders WHERE message_id = 'huge-scale'"
        ).fetchone()
    assert row is not None and stored[0] == Decimal(number)


def test_the_reviewers_amount_is_dead_lettered_with_a_reason():
    body = (
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e1000000000000000000}'
    )
    assert outcome(body) == (
        "dead",
        "'total_amount' must be an amount from 0 to 9999999999.99, 2 decimals",
    )


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_an_order_or_a_reason(body):
    verdict, values = outcome(body)
    if verdict == "order":
        assert_storable(values)


@settings(max_examples=600, deadline=None)
@given(order_texts())
def test_any_order_shaped_json_gives_an_order_or_a_reason(text):
    verdict, values = outcome(text.encode())
    if verdict == "order":
        assert_storable(values)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    )
)
def test_any_json_value_gives_an_order_or_a_reason(value):
    outcome(json.dumps(value).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    order_texts(),
    st.text(max_size=300)
    | st.none()
    | st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
)
def test_whatever_billing_accepts_postgresql_stores(billing_db, text, message_id):
    verdict, values = outcome(text.encode())
    if verdict != "order":
        return
    if isinstance(message_id, str) and len(message_id) <= 200 and message_id.isascii():
        message_id = billing.keyed_message_id(values, message_id)  # a key's id
    try:
        billing.check_message_id(message_id, values)
    except billing.InvalidOrder:
        return
    with (
        helpers.admin_connect(billing_db) as conn,
        conn.transaction(force_rollback=True),
    ):
        conn.execute(
            billing.QUERIES["insert_orders"],
            {
                "user_ids": [values[0]],
                "numbers_of_items": [values[1]],
                "total_amounts": [values[2]],
                "message_ids": [message_id],
            },
        )


def test_two_consumers_storing_the_same_orders_never_deadlock(orders_db):
    """Two billing hosts may hold the same messages at once (a redelivery after
    a connection dropped mid-batch), each batch in its own order: the rows are
    locked in one global order, so neither waits on the other in a cycle."""
    conninfo = psycopg.conninfo.make_conninfo(
        host="127.0.0.1",
        dbname=orders_db,
        user=helpers.ENV["BILLING_DB_USER"],
        password=helpers.ENV["BILLING_DB_PASSWORD"],
    )
    stores = [billing._Store(conninfo, lambda _: False) for _ in range(2)]
    errors = []
    for attempt in range(20):
        batch = [(1, 1, Decimal("1.00"), f"lock-{attempt}-{i:04}") for i in range(500)]
        random.Random(attempt).shuffle(batch)
        start = threading.Barrier(2)

        def store(rows, store, start=start):
            start.wait()
            try:
                store._commit(rows)
            except psycopg.Error as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=store, args=(rows, s))
            for rows, s in zip((batch, batch[::-1]), stores, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for s in stores:
        s.close()
    assert errors == []
    count = helpers.rows(
        orders_db, "SELECT count(DISTINCT message_id), count(*) FROM orders"
    )
    assert count == [(20 * 500, 20 * 500)]


# --- Services ---


@pytest.fixture
def consumer(queue, orders_db):
    """A billing consumer on the test queue and empty orders (not started)."""
    service = helpers.Service("billing", helpers.billing_env(queue))
    yield service
    service.stop(signal.SIGKILL)


def order(user_id, amount="9.99"):
    """A valid order body."""
    return {"user_id": user_id, "number_of_items": 1, "total_amount": amount}


def stored():
    """{user_id: rows} in billing_test.orders."""
    return dict(
        helpers.rows(
            helpers.BILLING_TEST_DB, "SELECT user_id, count(*) FROM orders GROUP BY 1"
        )
    )


def assert_channel_never_closed(service):
    """The broker never closed billing's channel or connection."""
    log = service.log_path.read_text(errors="replace")
    signs = ("PRECONDITION_FAILED", "unknown delivery tag", "Traceback", "unavailable")
    for sign in signs:
        assert sign not in log, f"billing's log shows {sign}:\n{service.tail(20)}"


def test_huge_exponent_is_dead_lettered_and_billing_stays_up(consumer, queue):
    poison = (
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e1000000000000000000}'
    )
    ids = [helpers.message_id(label) for label in ("h1", "h-poison", "h2")]
    helpers.publish_raw(queue, [order(1), poison, order(2)], ids)
    consumer.start()
    helpers.wait_for(
        lambda: stored() == {1: 1, 2: 1} or consumer.proc.poll() is not None,
        what="the orders around the poison",
    )
    assert consumer.proc.poll() is None, consumer.tail()
    helpers.wait_for(
        lambda: helpers.queue_depth(f"{queue}.dead") == 1, what="the dead letter"
    )
    assert f"rejected message '{ids[1]}': 'total_amount' must be" in consumer.tail()


def test_amounts_with_a_huge_scale_are_stored_not_dead_lettered(consumer, queue):
    # The reviewer's 200 that was lost: "1." and 16,384 zeros passed both
    # checks, then PostgreSQL refused the insert and billing dead-lettered it.
    bodies = [
        f'{{"user_id": {i}, "number_of_items": 1, "total_amount": {n}}}'.encode()
        for i, n in enumerate(HUGE_SCALES, 1)
    ]
    helpers.publish_raw(
        queue, bodies, [helpers.message_id(f"scale-{i}") for i in range(len(bodies))]
    )
    consumer.start()
    helpers.wait_for(lambda: len(stored()) == len(bodies), what="every order")
    amounts = helpers.rows(
        helpers.BILLING_TEST_DB, "SELECT total_amount FROM orders ORDER BY user_id"
    )
    assert [a for (a,) in amounts] == [Decimal(n) for n in HUGE_SCALES]
    assert helpers.queue_depth(f"{queue}.dead") == 0
    assert_channel_never_closed(consumer)


def test_nack_then_ack_never_stores_an_order_twice(consumer, queue):
    # The reviewer's case: a valid order, then not-JSON,
    # in one batch; then the other order too (the nacked tag not last).
    helpers.publish_raw(queue, [order(1), b"not json"])
    consumer.start()
    helpers.wait_for(
        lambda: helpers.queue_depth(f"{queue}.dead") == 1, what="the dead letter"
    )
    helpers.publish_raw(queue, [order(2), b"not json", order(3)])
    helpers.wait_for(
        lambda: helpers.queue_depth(f"{queue}.dead") == 2, what="the second dead letter"
    )
    helpers.wait_for(lambda: stored() == {1: 1, 2: 1, 3: 1}, what="three orders")
    time.sleep(1.5)  # a redelivered duplicate would show up by now
    assert stored() == {1: 1, 2: 1, 3: 1}
    assert helpers.queue_depth(queue) == 0
    assert_channel_never_closed(consumer)


# --- 3. Database errors that are not the message's fault ---

DB_FAULTS = {
    "revoked_privilege": (
        "REVOKE INSERT ON orders FROM {role}",
        "GRANT INSERT ON orders TO {role}",
    ),
    "missing_table": (
        "ALTER TABLE orders RENAME TO orders_away",
        "ALTER TABLE orders_away RENAME TO orders",
    ),
    "read_only": (
        "ALTER DATABASE billing_test SET default_transaction_read_only = on",
        "ALTER DATABASE billing_test RESET default_transaction_read_only",
    ),
    "every_row_refused": (
        "ALTER TABLE orders ADD CONSTRAINT no_orders CHECK (user_id < 0) NOT VALID",
        "ALTER TABLE orders DROP CONSTRAINT no_orders",
    ),
}


@pytest.mark.parametrize("fault", list(DB_FAULTS))
def test_database_fault_dead_letters_nothing(consumer, queue, fault):
    breaks, repairs = (
        sql.format(role=helpers.ENV["BILLING_DB_USER"]) for sql in DB_FAULTS[fault]
    )
    helpers.publish_raw(
        queue,
        [order(i) for i in range(1, 21)],
        [helpers.message_id(f"f{i}") for i in range(20)],
    )
    with helpers.admin_connect(helpers.BILLING_TEST_DB) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute(breaks)
    try:
        consumer.start()
        time.sleep(3)  # billing meets the fault, and should back off
        assert consumer.proc.poll() is None, consumer.tail()
        assert helpers.queue_depth(f"{queue}.dead") == 0, consumer.tail()
    finally:
        with helpers.admin_connect(helpers.BILLING_TEST_DB) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(repairs)
    helpers.wait_for(lambda: len(stored()) == 20, timeout=30, what="the 20 orders")
    assert stored() == {i: 1 for i in range(1, 21)}
    assert helpers.queue_depth(f"{queue}.dead") == 0


def test_a_row_postgresql_refuses_is_dead_lettered_alone(consumer, queue):
    with helpers.admin_connect(helpers.BILLING_TEST_DB) as conn:
        conn.execute("ALTER TABLE orders ADD CONSTRAINT not_666 CHECK (user_id <> 666)")
    try:
        helpers.publish_raw(queue, [order(1), order(666), order(2)])
        consumer.start()
        helpers.wait_for(
            lambda: helpers.queue_depth(f"{queue}.dead") == 1, what="the refused order"
        )
        helpers.wait_for(lambda: stored() == {1: 1, 2: 1}, what="the two others")
    finally:
        with helpers.admin_connect(helpers.BILLING_TEST_DB) as conn:
            conn.execute("ALTER TABLE orders DROP CONSTRAINT not_666")


# --- A message that kills billing, for any reason ---

# billing with a fault planted in its parser: a body containing the marker
# kills the process (SIGKILL, abort) or raises, the way an unknown bug would.
FAULTY_BILLING = """
import os, signal, sys
import billing
marker, how = sys.argv[1].encode(), sys.argv[2]
parse = billing.parse_order

def faulty_parse(body):
    if marker in body:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "abort":
            os.abort()
        while how == "hang":
            pass
        raise RuntimeError("a bug nobody knows yet")
    return parse(body)

billing.parse_order = faulty_parse
billing.main()
"""


class Supervisor:
    """Runs a process again each time it exits, as PM2 does; counts restarts."""

    def __init__(self, args, env):
        self.args, self.env, self.restarts, self.proc = args, env, 0, None
        helpers.LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = helpers.LOGS / f"faulty-billing-{uuid.uuid4().hex[:8]}.log"

    def _spawn(self):
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=helpers.ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def watch(self, seconds, done):
        """Keep the process up for up to `seconds`, until done() is true."""
        if self.proc is None:
            self._spawn()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done():
            if self.proc.poll() is not None:
                self.restarts += 1
                self._spawn()
            time.sleep(0.05)

    def stop(self):
        """SIGTERM the process; return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.mark.parametrize("how", ["raise", "kill", "abort", "hang"])
def test_a_message_that_kills_billing_is_dead_lettered_not_looped(
    queue, orders_db, how
):
    marker = f"crash-{uuid.uuid4().hex[:6]}"
    poison = json.dumps({**order(500), "note": marker})
    bodies = [order(1), poison, order(2), *[order(i) for i in range(3, 50)]]
    helpers.publish_raw(
        queue, bodies, [helpers.message_id(f"c{i}") for i in range(len(bodies))]
    )
    env = {**os.environ, **helpers.billing_env(queue), "PYTHONUNBUFFERED": "1"}
    supervisor = Supervisor([helpers.PYTHON, "-c", FAULTY_BILLING, marker, how], env)
    try:
        supervisor.watch(
            40,
            lambda: helpers.queue_depth(f"{queue}.dead") == 1 and len(stored()) == 48,
        )
        log = supervisor.log_path.read_text(errors="replace")
        assert helpers.queue_depth(f"{queue}.dead") == 1, log[-3000:]
        assert stored() == {i: 1 for i in range(1, 50)}
        assert supervisor.restarts <= (0 if how == "raise" else 1), log[-3000:]
        time.sleep(1)
        assert supervisor.proc.poll() is None, log[-3000:]
        assert supervisor.stop() == 0
        assert f"rejected message '{helpers.message_id('c1')}': " in log
    finally:
        if supervisor.proc.poll() is None:
            supervisor.proc.kill()


# --- 14. bigint ids, migrated in place ---

OLD_SCHEMAS = {  # the schema files as they were before the migration (b68aeb4)
    "billing_schema.sql": """
CREATE TABLE IF NOT EXISTS orders (
    id              integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         integer NOT NULL CHECK (user_id > 0),
    number_of_items integer NOT NULL CHECK (number_of_items > 0),
    total_amount    numeric(12, 2) NOT NULL CHECK (total_amount >= 0),
    message_id      text UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);""",
    "inventory_schema.sql": """
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE TABLE IF NOT EXISTS movies (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title       text NOT NULL,
    description text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS movies_title_trgm
    ON movies USING gin (title gin_trgm_ops) WITH (fastupdate = off);""",
}
OLD_ROWS = {
    "billing_schema.sql": (
        "orders",
        (
            "INSERT INTO orders (user_id, number_of_items, total_amount, message_id)"
            " VALUES (1, 2, 3.50, 'old-1'), (4, 5, 6, NULL)"
        ),
        "INSERT INTO orders (user_id, number_of_items, total_amount) VALUES (7, 8, 9)",
    ),
    "inventory_schema.sql": (
        "movies",
        "INSERT INTO movies (title) VALUES ('old one'), ('old two')",
        "INSERT INTO movies (title) VALUES ('new one')",
    ),
}


def psql_file(dbname, path):
    """Run a schema file with psql -f as the postgres user, stopping on errors."""
    subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            dbname,
            "-f",
            str(path),
        ],
        check=True,
        capture_output=True,
    )


def id_types(dbname, table):
    """(column type, identity sequence type) of table.id."""
    return helpers.rows(
        dbname,
        "SELECT c.data_type, s.data_type::text FROM information_schema.columns c"
        " JOIN pg_sequences s ON s.sequencename = %s"
        " WHERE c.table_name = %s AND c.column_name = 'id'",
        (f"{table}_id_seq", table),
    )[0]


@pytest.mark.parametrize("schema", list(OLD_SCHEMAS))
def test_schema_migrates_an_old_database_to_bigint_ids(schema):
    dbname = f"migrate_test_{schema.split('_')[0]}"
    table, old_insert, new_insert = OLD_ROWS[schema]
    with helpers.admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        with helpers.admin_connect(dbname) as conn:
            conn.execute(OLD_SCHEMAS[schema])
            conn.execute(old_insert)
        assert id_types(dbname, table) == ("integer", "integer")
        for _ in range(2):  # idempotent: the second run changes nothing
            psql_file(dbname, helpers.ROOT / "sql" / schema)
            assert id_types(dbname, table) == ("bigint", "bigint")
        with helpers.admin_connect(dbname) as conn:
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN id RESTART WITH 3000000000")
            conn.execute(new_insert)
            ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
        assert ids == [1, 2, 3_000_000_000]
    finally:
        with helpers.admin_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def test_billing_stores_order_ids_beyond_32_bits(consumer, queue):
    with helpers.admin_connect(helpers.BILLING_TEST_DB) as conn:
        conn.execute("ALTER TABLE orders ALTER COLUMN id RESTART WITH 4000000000")
    helpers.publish_raw(queue, [order(1)])
    consumer.start()
    helpers.wait_for(lambda: stored() == {1: 1}, what="the order")
    assert helpers.rows(helpers.BILLING_TEST_DB, "SELECT id FROM orders") == [
        (4_000_000_000,)
    ]
    assert "stored order 4000000000: user 1" in consumer.tail()


# --- Generative: random messages, batches and kills ---


def poison_body(rng):
    """A message billing must dead-letter."""
    return rng.choice(
        [
            b"not json",
            b"\xff\xfe",
            b"",
            b"[" * rng.randrange(1, 5000),
            b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e1000000000000000000}',
            b'{"user_id": 1, "number_of_items": 1, "total_amount": NaN}',
            b'{"user_id": 1, "number_of_items": 1, "total_amount": "1.999"}',
            b'{"user_id": 1, "number_of_items": 0, "total_amount": 1}',
            b'{"user_id": 1, "number_of_items": 1, "total_amount": '
            + b"9" * 5000
            + b"}",
            json.dumps(order(-rng.randrange(1, 10**6))).encode(),
        ]
    )


def generate(rng, first_user):
    """[(body, message_id, user_id or None if invalid)], user ids from first_user."""
    messages, keyed = [], []
    user = first_user
    for _ in range(rng.randrange(400, 1500)):
        kind = rng.choice(["keyed", "keyed_retry", "unkeyed", "no_id", "invalid"])
        if kind == "keyed_retry" and keyed:
            messages.append(rng.choice(keyed))  # a retry of an order sent before
            continue
        if kind == "invalid":
            message_id = rng.choice([None, f"bad-{uuid.uuid4()}"])
            messages.append((poison_body(rng), message_id, None))
            continue
        user += 1
        amount = rng.choice(["0", "0.5", "19.99", 7, "9999999999.99"])
        body = json.dumps(order(user, amount)).encode()
        if kind == "no_id":  # published by hand: dead-lettered
            messages.append((body, None, None))
        elif kind == "unkeyed":
            messages.append((body, uuid.uuid4().hex, user))  # as the gateway does
        else:
            key = uuid.uuid4().hex[:8]
            message_id = billing.keyed_message_id(billing.parse_order(body), key)
            keyed.append((body, message_id, user))
            messages.append(keyed[-1])
    return messages


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_messages_batches_and_kills(consumer, queue, seed):
    rng = random.Random(seed)
    first_user = 1_000_000 * seed
    messages = generate(rng, first_user)
    kills, started = 0, time.monotonic()
    position = 0
    while position < len(messages):  # publish in random chunks, kill at random
        size = rng.choice([1, 3, 10, 40, 150, 400])
        chunk = messages[position : position + size]
        position += size
        helpers.publish_raw(queue, [m[0] for m in chunk], [m[1] for m in chunk])
        if consumer.proc is None:
            consumer.start()
        time.sleep(rng.choice([0, 0.02, 0.1, 0.3, 0.6]))
        if rng.random() < 0.35:
            consumer.stop(signal.SIGKILL)
            kills += 1
            consumer.start()
    for _ in range(rng.randrange(3)):  # and while it drains what is left
        time.sleep(rng.uniform(0.2, 0.8))
        if helpers.queue_depth(queue):
            consumer.stop(signal.SIGKILL)
            kills += 1
            consumer.start()
    valid = {m[2] for m in messages if m[2] is not None}
    invalid = sum(1 for m in messages if m[2] is None)
    helpers.wait_for(
        lambda: set(stored()) >= valid, timeout=40, what="every valid order"
    )
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    time.sleep(0.5)
    counts = stored()
    twice = {u: n for u, n in counts.items() if n != 1}
    # Every stored message has the gateway's message id: each is stored once.
    assert not twice, twice
    assert set(counts) == valid
    assert helpers.queue_depth(f"{queue}.dead") == invalid
    assert consumer.stop() == 0
    assert_channel_never_closed(consumer)
    print(
        f"seed={seed} messages={len(messages)} valid={len(valid)} invalid={invalid}"
        f" kills={kills}"
        f" seconds={time.monotonic() - started:.1f}"
    )
