"""Billing: stores the orders queued on RabbitMQ in PostgreSQL.

Consumes JSON orders {"user_id", "number_of_items", "total_amount"} (numbers
or numeric strings) from the billing queue, inserts them into table `orders`
in batches and acks each message only after its row is committed. A message
that can never be stored is dead-lettered to "<queue>.dead"; one redelivered
after a crash is stored once (deduplicated on its AMQP message_id). A message
redelivered after a crash is parsed in a child process, so a body that kills
the parser is dead-lettered instead of killing billing a second time.

Settings (environment, then .env beside this file): BILLING_DB_HOST,
BILLING_DB_PORT, BILLING_DB_SSLMODE, BILLING_DB_NAME, BILLING_DB_USER,
BILLING_DB_PASSWORD, RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_BILLING_USER,
RABBITMQ_BILLING_PASSWORD, RABBITMQ_QUEUE; optional LOG_LEVEL (INFO),
RABBITMQ_HOSTS (a cluster's nodes, tried in turn).

Each order is logged with its message_id (the gateway's X-Message-Id) when it
is stored (INFO, stdout) or dead-lettered (WARNING, stderr).
"""

import os

if __name__ == "__main__":
    # pika imports Python's ssl, so the system's OpenSSL is loaded anyway: psycopg
    # runs its Python layer over the system's libpq, which shares it, instead of
    # psycopg-binary's libpq with a second OpenSSL (~2.6 MiB resident).
    os.environ.setdefault("PSYCOPG_IMPL", "python")

import hashlib
import json
import logging
import re
import select
import signal
import sys
import time
import types
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from typing import NamedTuple

import pika
import psycopg
from dotenv import load_dotenv
from pika.exceptions import AMQPError
from pika.exceptions import ChannelClosedByBroker

log = logging.getLogger("billing")

HERE = Path(__file__).resolve().parent
PREFETCH = 1000  # unacked messages RabbitMQ may hand us at once
BATCH_SIZE = 500  # orders per INSERT and per ack
BATCH_WAIT = 0.05  # seconds a partial batch may wait for more messages
PARSE_TIMEOUT = 5  # seconds to parse a message (or batch); a hang beyond is a crash

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

Verdict = tuple[Order | None, str | None]  # (order, None) or (None, why dead)
Suspect = tuple[int, Any, bytes]  # delivery tag, message_id, body
Row = tuple[int, int, Decimal, Any]  # an order and its message_id, to insert


class Delivery(NamedTuple):
    """A message as RabbitMQ delivered it."""

    tag: int
    redelivered: bool  # unsettled when a consumer stopped: maybe it killed billing
    properties: Any  # pika's BasicProperties: message_id among them
    body: bytes


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
    "RABBITMQ_BILLING_USER",
    "RABBITMQ_BILLING_PASSWORD",
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


QUERIES = load_queries(HERE / "sql" / "billing_queries.sql")


# --- Validation ---


def parse_order(body: bytes) -> Order:
    """Turn a message body into (user_id, number_of_items, total_amount)."""
    if len(body) > MAX_ORDER_BODY:
        raise InvalidOrder(f"body over {MAX_ORDER_BODY} bytes")
    try:
        data = json.loads(
            body, parse_float=_parse_decimal, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        raise InvalidOrder(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidOrder("not a JSON object")
    return check_order(data)


def _reject_constant(name: str) -> None:
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not allowed")


def _parse_decimal(text: str) -> Decimal:
    """A JSON number with a fraction or exponent; NaN (refused) if out of range."""
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent beyond Decimal's range: 1e1000000000000000000
        return Decimal("NaN")


def read_message(body: bytes, message_id: Any) -> Verdict:
    """Return (order, None) for a message that can be stored, else (None, reason)."""
    try:
        order = parse_order(body)
        check_message_id(message_id, order)
        return order, None
    except InvalidOrder as exc:
        return None, str(exc)
    except Exception as exc:  # a bug: this message's fault, not billing's end
        log.exception("reading message %r failed", message_id)
        return None, f"billing failed on it: {exc!r}"


def read_apart(messages: list[Suspect]) -> dict[int, Verdict]:
    """read_message for each (tag, message_id, body), in a child process.

    Returns {tag: (order, reason)}. The child answers one line per message,
    in order; if it dies, hangs or fails, the first message it did not answer
    is the culprit: it gets the reason, and the rest go to a new child.
    Billing itself never parses them.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: parse, write one JSON line per message, exit
        os.close(reader)
        status = 1
        try:
            for tag, message_id, body in messages:
                order, reason = read_message(body, message_id)
                answer = None if order is None else [*order[:2], str(order[2])]
                line = json.dumps([tag, answer, reason]).encode() + b"\n"
                while line:  # unbuffered: what was answered survives a crash
                    line = line[os.write(writer, line) :]
            status = 0
        finally:
            os._exit(status)  # no atexit, no cleanup of the parent's connections
    os.close(writer)
    output, failure = _read_child(reader, pid)
    verdicts = {}
    for line in output.split(b"\n")[:-1]:  # complete lines only
        tag, order, reason = json.loads(line)
        if order is not None:
            order = (order[0], order[1], Decimal(order[2]))
        verdicts[tag] = (order, reason)
    if failure is None or len(verdicts) >= len(messages):
        return verdicts
    culprit, rest = messages[len(verdicts)], messages[len(verdicts) + 1 :]
    log.warning("message %r made billing's parser fail: %s", culprit[1], failure)
    verdicts[culprit[0]] = (None, f"billing's parser failed on it: {failure}")
    return {**verdicts, **(read_apart(rest) if rest else {})}


def _read_child(reader: int, pid: int) -> tuple[bytes, str | None]:
    """Collect a child's output; return (bytes, None or how the child failed)."""
    chunks, deadline, failure = [], time.monotonic() + PARSE_TIMEOUT, None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([reader], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                failure = f"no answer within {PARSE_TIMEOUT}s"
                break
            chunk = os.read(reader, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            deadline = time.monotonic() + PARSE_TIMEOUT  # per message, not per batch
    finally:
        os.close(reader)
    _, status = os.waitpid(pid, 0)
    if failure is None and os.WIFSIGNALED(status):
        failure = f"killed by signal {os.WTERMSIG(status)}"
    elif failure is None and os.waitstatus_to_exitcode(status) != 0:
        failure = f"exit status {os.waitstatus_to_exitcode(status)}"
    return b"".join(chunks), failure


# --- Consumer ---


def read_batch(batch: list[Delivery]) -> tuple[list[tuple[int, Row]], dict[int, str]]:
    """Parse a batch: ([(tag, row to insert)], {tag: dead-letter reason}).

    A redelivered message was unsettled when a consumer stopped, maybe
    because it killed or hung billing: those are parsed in a child process.
    """
    suspects = [(tag, p.message_id, body) for tag, again, p, body in batch if again]
    verdicts = read_apart(suspects) if suspects else {}
    # SIGALRM's default action ends the process: a parser stuck in a loop
    # becomes a crash, and the message is a suspect when redelivered.
    signal.alarm(PARSE_TIMEOUT)
    try:
        for tag, _, properties, body in batch:
            if tag not in verdicts:
                verdicts[tag] = read_message(body, properties.message_id)
    finally:
        signal.alarm(0)
    rows: list[tuple[int, Row]] = []
    dead, seen = {}, set()
    for tag, _, properties, _ in batch:
        message_id = properties.message_id
        order, reason = verdicts[tag]
        if reason is not None:
            dead[tag] = reason
        elif order is not None and (message_id is None or message_id not in seen):
            seen.add(message_id)  # the same message twice in one batch: once
            rows.append((tag, (*order, message_id)))
    return rows, dead


def settle(channel: Any, batch: list[Delivery], dead: dict[int, str]) -> None:
    """Dead-letter the messages in `dead`, then ack the rest of the batch.

    The nacks go first, and the one ack (multiple) goes to the last tag not
    nacked: it covers only this batch's unsettled messages, never a tag
    already nacked (the broker would close the channel for that).
    """
    for tag, _, properties, _ in batch:
        if tag in dead:
            log.warning(
                "rejected message %r: %s (dead-lettered)",
                properties.message_id,
                dead[tag],
            )
            channel.basic_nack(tag, requeue=False)
    kept = [tag for tag, _, _, _ in batch if tag not in dead]
    if kept:
        channel.basic_ack(kept[-1], multiple=True)


class _Store:
    """Commits batches to the table, then settles their messages on the channel.

    No message can make billing fail in a loop, and no database outage
    dead-letters anything: it waits (sleep, which says False once stopping).
    """

    def __init__(self, conninfo: str, sleep: Callable[[float], bool]) -> None:
        self.conninfo, self.sleep = conninfo, sleep
        self._db: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        """Close the database connection (Consumer.run, when it stops)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def store(self, channel: Any, batch: list[Delivery]) -> None:
        """Store a batch (Consumer._consume); if it fails, its messages one by one.

        A message that fails again alone is dead-lettered with the error.
        """
        try:
            self._store_batch(channel, batch)
        except (AMQPError, OSError):
            raise  # the broker went away (or fork failed): reconnect, retry
        except Exception as exc:
            if len(batch) == 1:
                log.exception("storing message %r failed", batch[0][2].message_id)
                settle(channel, batch, {batch[0][0]: f"billing failed: {exc!r}"})
                return
            log.exception("storing a batch failed; storing its orders one by one")
            for message in batch:
                self.store(channel, [message])

    def _store_batch(self, channel: Any, batch: list[Delivery]) -> None:
        """Insert a batch (store), then settle: dead-letter the bad, ack the rest."""
        rows, dead = read_batch(batch)
        if rows and not self._insert_rows(rows, dead):
            return  # stopping while the database is down: leave all unacked
        settle(channel, batch, dead)

    def _insert_rows(self, rows: list[tuple[int, Row]], dead: dict[int, str]) -> bool:
        """Commit the rows; those PostgreSQL refuses join `dead`. False if stopped.

        Only a row refused for its values (a data or integrity error) is
        dead-lettered; if every row of a batch is refused, the table is to blame:
        wait and retry, as for an outage.
        """
        backoff = Backoff()
        while True:
            backoff.start()
            try:
                return self._insert([values for _, values in rows])
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                log.warning("batch refused (%s); storing its orders one by one", exc)
            refused = {}
            for tag, values in rows:
                try:
                    if not self._insert([values]):
                        return False
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    refused[tag] = str(exc)
            if len(rows) == 1 or len(refused) < len(rows):
                dead.update(refused)
                return True
            delay = backoff.failed()
            log.warning(
                "PostgreSQL refused all %d orders; retrying in %.1fs", len(rows), delay
            )
            if not self.sleep(delay):
                return False

    def _insert(self, rows: list[Row]) -> bool:
        """Commit the rows, waiting out database outages; False if stopped.

        Any error but a data or integrity error is an outage (server down, a
        missing table, a revoked privilege, a read-only database): nothing is
        dead-lettered for it.
        """
        backoff = Backoff()
        while True:
            backoff.start()
            try:
                self._commit(rows)
                return True
            except (psycopg.DataError, psycopg.IntegrityError):
                raise
            except psycopg.Error as exc:
                delay = backoff.failed()
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                self.close()
                if not self.sleep(delay):
                    return False

    def _commit(self, rows: list[Row]) -> None:
        """Insert the rows in one transaction (_insert), connecting if need be."""
        if self._db is None:
            self._db = psycopg.connect(self.conninfo)
        message_ids = [r[3] for r in rows]
        with self._db.transaction():
            self._db.execute(QUERIES["lock_message_ids"], {"message_ids": message_ids})
            (stored,) = self._db.execute(
                QUERIES["insert_orders"],
                {
                    "user_ids": [r[0] for r in rows],
                    "numbers_of_items": [r[1] for r in rows],
                    "total_amounts": [r[2] for r in rows],
                    "message_ids": message_ids,
                },
            ).fetchone() or (None,)
        if stored:
            log.info(stored)  # one line per order, in one call per batch


class Consumer:
    """Moves orders from the queue to the table, one batch at a time.

    run -> _consume (one connection) -> _declare, then _Store.store per batch.
    """

    def __init__(
        self,
        params: pika.ConnectionParameters | list[pika.ConnectionParameters],
        queue: str,
        conninfo: str,
    ) -> None:
        self.nodes, self.queue = Nodes(params), queue
        self.stopping = False
        self._conn: Any = None  # the connection being consumed from, or None
        self._store = _Store(conninfo, self.sleep)
        self._check_only = False  # the broker refused to let us declare queues

    def stop(
        self, signum: int | None = None, frame: types.FrameType | None = None
    ) -> None:
        """Ask the consumer to finish its batch and exit (signal handler)."""
        if not self.stopping:
            log.info("stopping")
        self.stopping = True

    def run(self) -> None:
        """Consume until stopped (main), reconnecting (_consume) with a back-off."""
        backoff = Backoff()
        while not self.stopping:
            backoff.start()
            try:
                self._consume(pika.BlockingConnection(self.nodes.take()))
            except (AMQPError, OSError) as exc:
                delay = backoff.failed()
                log.warning("RabbitMQ unavailable (%s); retrying in %.1fs", exc, delay)
                self.sleep(delay)
        self._store.close()
        log.info("billing stopped")

    def _consume(self, conn: Any) -> None:
        """Declare the queues (_declare), then store batches until stopped or cut."""
        self._conn = conn
        try:
            channel = self._declare(conn)
            channel.basic_qos(prefetch_count=PREFETCH)
            log.info("consuming from queue %s", self.queue)
            batch: list[Delivery] = []
            started = 0.0
            for method, properties, body in channel.consume(
                self.queue, inactivity_timeout=BATCH_WAIT
            ):
                if method is not None:
                    if not batch:
                        started = time.monotonic()
                    batch.append(
                        Delivery(
                            method.delivery_tag, method.redelivered, properties, body
                        )
                    )
                full = len(batch) >= BATCH_SIZE
                late = batch and time.monotonic() - started >= BATCH_WAIT
                if full or late or (batch and self.stopping):
                    self._store.store(channel, batch)
                    batch = []
                if self.stopping:
                    break
            channel.cancel()  # requeues what was delivered but not taken
        finally:
            self._conn = None
            if conn.is_open:
                conn.close()

    def _declare(self, conn: Any) -> Any:
        """Declare both queues on a new channel (_consume) and return it.

        A user that may not declare them (billing's on the VMs may only
        consume) checks, on a second channel, that they exist.
        """
        channel = conn.channel()
        if not self._check_only:
            try:
                channel.queue_declare(f"{self.queue}.dead", durable=True)
                channel.queue_declare(
                    self.queue, durable=True, arguments=queue_arguments(self.queue)
                )
                return channel
            except ChannelClosedByBroker as exc:
                if exc.reply_code != ACCESS_REFUSED:
                    raise
            log.info("may not declare queue %s: checking that it exists", self.queue)
            self._check_only = True
            channel = conn.channel()
        channel.queue_declare(f"{self.queue}.dead", durable=True, passive=True)
        channel.queue_declare(self.queue, durable=True, passive=True)
        return channel

    def sleep(self, seconds: float) -> bool:
        """Wait, keeping the RabbitMQ connection alive; False if stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            if self._conn is None:
                time.sleep(0.1)
            else:
                self._conn.sleep(0.1)
        return not self.stopping


# --- Main ---


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
    """Consume until SIGTERM or SIGINT, then exit 0."""
    config = load_config("billing", REQUIRED)
    setup_logging("billing", os.environ.get("LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    params = connection_parameters(config, "billing")
    conninfo = database_conninfo(config, "BILLING", "billing")
    consumer = Consumer(params, config["RABBITMQ_QUEUE"], conninfo)
    signal.signal(signal.SIGTERM, consumer.stop)
    signal.signal(signal.SIGINT, consumer.stop)
    consumer.run()


if __name__ == "__main__":
    main()
