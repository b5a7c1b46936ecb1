"""Billing: stores the orders queued on RabbitMQ in PostgreSQL.

Consumes JSON orders {"user_id", "number_of_items", "total_amount"} (numbers
or numeric strings) from the billing queue, inserts them into table `orders`
in batches and acks each message only after its row is committed. A message
that can never be stored is dead-lettered to "<queue>.dead"; one redelivered
after a crash is stored once (deduplicated on its AMQP message_id).

Settings (environment, then .env beside this file): BILLING_DB_HOST,
BILLING_DB_PORT, BILLING_DB_SSLMODE, BILLING_DB_NAME, BILLING_DB_USER,
BILLING_DB_PASSWORD, RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_USER,
RABBITMQ_PASSWORD, RABBITMQ_QUEUE; optional LOG_LEVEL (INFO).

Each order is logged with its message_id (the gateway's X-Message-Id) when it
is stored (INFO, stdout) or dead-lettered (WARNING, stderr).
"""

import os

if __name__ == "__main__":
    # pika imports Python's ssl, so the system's OpenSSL is loaded anyway: psycopg
    # runs its Python layer over the system's libpq, which shares it, instead of
    # psycopg-binary's libpq with a second OpenSSL (~2.6 MiB resident).
    os.environ.setdefault("PSYCOPG_IMPL", "python")

import json
import logging
import re
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path

import pika
import psycopg
from dotenv import load_dotenv
from pika.exceptions import AMQPError

log = logging.getLogger("billing")

HERE = Path(__file__).resolve().parent
PREFETCH = 1000  # unacked messages RabbitMQ may hand us at once
BATCH_SIZE = 500  # orders per INSERT and per ack
BATCH_WAIT = 0.05  # seconds a partial batch may wait for more messages
MAX_BACKOFF = 5  # seconds between reconnect attempts, at most
MAX_DB_INT = 2**31 - 1
MAX_MESSAGE_ID = 255
MAX_AMOUNT = Decimal("9999999999.99")  # numeric(12, 2)
ORDER_FIELDS = ("user_id", "number_of_items", "total_amount")
_INTEGER = re.compile(r"[0-9]{1,10}")
_AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")

# --- Config ---

REQUIRED = (
    "BILLING_DB_HOST",
    "BILLING_DB_PORT",
    "BILLING_DB_SSLMODE",
    "BILLING_DB_NAME",
    "BILLING_DB_USER",
    "BILLING_DB_PASSWORD",
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_QUEUE",
)


def load_config():
    """Read settings from the environment (and .env); exit if any is missing."""
    load_dotenv(HERE / ".env")
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        sys.exit(f"billing: missing settings: {', '.join(missing)}")
    return {k: os.environ[k] for k in REQUIRED}


def queue_arguments(queue):
    """The billing queue's arguments; gateway.py declares it identically."""
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dead",
    }


# --- SQL ---

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(path):
    """Return {name: sql} for each '-- name: x' block in the file."""
    parts = _NAME.split(path.read_text())
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2])}


QUERIES = load_queries(HERE / "sql" / "billing_queries.sql")


# --- Validation ---


class InvalidOrder(Exception):
    """A message that can never be stored."""


def check_positive_int(value, field):
    """Accept a positive integer, as a JSON number or a string of digits."""
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_DB_INT:
        raise InvalidOrder(
            f"'{field}' must be a positive integer (at most {MAX_DB_INT})"
        )
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
        raise InvalidOrder(f"'{field}' must be an amount from 0 to {MAX_AMOUNT}")
    return value


def parse_order(body):
    """Turn a message body into (user_id, number_of_items, total_amount)."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidOrder(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidOrder("not a JSON object")
    for field in ORDER_FIELDS:
        if field not in data:
            raise InvalidOrder(f"'{field}' is missing")
    return (
        check_positive_int(data["user_id"], "user_id"),
        check_positive_int(data["number_of_items"], "number_of_items"),
        check_amount(data["total_amount"], "total_amount"),
    )


def check_message_id(message_id):
    """A message_id must be text PostgreSQL can store (or absent)."""
    if message_id is None:
        return
    if not isinstance(message_id, str) or "\x00" in message_id:
        raise InvalidOrder("message_id is not text")
    if len(message_id) > MAX_MESSAGE_ID:
        raise InvalidOrder(f"message_id over {MAX_MESSAGE_ID} characters")


def _reject_constant(name):
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not allowed")


# --- Consumer ---


class Consumer:
    """Moves orders from the queue to the table, one batch at a time."""

    def __init__(self, params, queue, conninfo):
        self.params, self.queue, self.conninfo = params, queue, conninfo
        self.stopping = False
        self._db = None

    def stop(self, signum=None, frame=None):
        """Ask the consumer to finish its batch and exit (signal handler)."""
        if not self.stopping:
            log.info("stopping")
        self.stopping = True

    def run(self):
        """Consume until stopped, reconnecting to RabbitMQ with a capped back-off."""
        delay = 0.5
        while not self.stopping:
            try:
                self._consume(pika.BlockingConnection(self.params))
                delay = 0.5
            except (AMQPError, OSError) as exc:
                log.warning("RabbitMQ unavailable (%s); retrying in %.1fs", exc, delay)
                self._sleep(None, delay)
                delay = min(delay * 2, MAX_BACKOFF)
        if self._db is not None:
            self._db.close()
        log.info("billing stopped")

    def _consume(self, conn):
        """Declare the queues, then store batches until stopped or disconnected."""
        try:
            channel = conn.channel()
            channel.queue_declare(f"{self.queue}.dead", durable=True)
            channel.queue_declare(
                self.queue, durable=True, arguments=queue_arguments(self.queue)
            )
            channel.basic_qos(prefetch_count=PREFETCH)
            log.info("consuming from queue %s", self.queue)
            batch, started = [], 0.0
            for method, properties, body in channel.consume(
                self.queue, inactivity_timeout=BATCH_WAIT
            ):
                if method is not None:
                    if not batch:
                        started = time.monotonic()
                    batch.append((method.delivery_tag, properties, body))
                full = len(batch) >= BATCH_SIZE
                late = batch and time.monotonic() - started >= BATCH_WAIT
                if full or late or (batch and self.stopping):
                    self._store(conn, channel, batch)
                    batch = []
                if self.stopping:
                    break
            channel.cancel()  # requeues what was delivered but not taken
        finally:
            if conn.is_open:
                conn.close()

    def _store(self, conn, channel, batch):
        """Insert a batch, dead-letter its bad messages, then ack the rest."""
        rows, seen = [], set()  # rows: (delivery tag, values to insert)
        for tag, properties, body in batch:
            message_id = properties.message_id
            try:
                order = parse_order(body)
                check_message_id(message_id)
            except InvalidOrder as exc:
                log.warning("rejected message %r, dead-lettered: %s", message_id, exc)
                channel.basic_nack(tag, requeue=False)
                continue
            if message_id is not None and message_id in seen:
                continue  # the same message twice in one batch
            seen.add(message_id)
            rows.append((tag, (*order, message_id)))
        try:
            if rows and not self._insert(conn, [values for _, values in rows]):
                return  # stopping while the database is down: leave all unacked
        except psycopg.Error as exc:
            # Not an outage: PostgreSQL refuses some row. Find it, one by one.
            log.warning("batch refused (%s); storing its orders one at a time", exc)
            for tag, values in rows:
                try:
                    if not self._insert(conn, [values]):
                        return
                except psycopg.Error as exc:
                    log.warning(
                        "rejected message %r, dead-lettered: %s", values[3], exc
                    )
                    channel.basic_nack(tag, requeue=False)
        channel.basic_ack(batch[-1][0], multiple=True)

    def _insert(self, conn, rows):
        """Commit the rows, waiting out database outages; False if stopped."""
        delay = 0.5
        while True:
            try:
                if self._db is None:
                    self._db = psycopg.connect(self.conninfo)
                with self._db.transaction():
                    (stored,) = self._db.execute(
                        QUERIES["insert_orders"],
                        {
                            "user_ids": [r[0] for r in rows],
                            "numbers_of_items": [r[1] for r in rows],
                            "total_amounts": [r[2] for r in rows],
                            "message_ids": [r[3] for r in rows],
                        },
                    ).fetchone()
                if stored:
                    log.info(stored)  # one line per order, in one call per batch
                return True
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                if self._db is not None:
                    self._db.close()
                    self._db = None
                if not self._sleep(conn, delay):
                    return False
                delay = min(delay * 2, MAX_BACKOFF)

    def _sleep(self, conn, seconds):
        """Wait, keeping the RabbitMQ connection alive; False if stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            if conn is None:
                time.sleep(0.1)
            else:
                conn.sleep(0.1)
        return not self.stopping


# --- Main ---


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


def main():
    """Consume until SIGTERM or SIGINT, then exit 0."""
    config = load_config()
    setup_logging("billing", os.environ.get("LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    params = pika.ConnectionParameters(
        host=config["RABBITMQ_HOST"],
        port=int(config["RABBITMQ_PORT"]),
        credentials=pika.PlainCredentials(
            config["RABBITMQ_USER"], config["RABBITMQ_PASSWORD"]
        ),
        heartbeat=30,
        socket_timeout=3,
        stack_timeout=5,
        connection_attempts=1,
        client_properties={"connection_name": "billing"},
    )
    conninfo = psycopg.conninfo.make_conninfo(
        host=config["BILLING_DB_HOST"],
        port=config["BILLING_DB_PORT"],
        dbname=config["BILLING_DB_NAME"],
        user=config["BILLING_DB_USER"],
        password=config["BILLING_DB_PASSWORD"],
        sslmode=config["BILLING_DB_SSLMODE"],
        gssencmode="disable",  # password logins only: no Kerberos probe
        connect_timeout=3,
        application_name="billing",
    )
    consumer = Consumer(params, config["RABBITMQ_QUEUE"], conninfo)
    signal.signal(signal.SIGTERM, consumer.stop)
    signal.signal(signal.SIGINT, consumer.stop)
    consumer.run()


if __name__ == "__main__":
    main()
