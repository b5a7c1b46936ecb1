"""AMQP: one back-off rule, a publisher that stops, the queue arguments once."""

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import helpers
import pika
import pytest

import billing
import gateway

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def waits(backoff, clock, lasted):
    """The waits failed() gives after attempts lasting each of `lasted` seconds."""
    result = []
    for seconds in lasted:
        backoff.start()
        clock.now += seconds
        result.append(backoff.failed())
    return result


def test_backoff_doubles_up_to_its_cap():
    clock = Clock()
    backoff = gateway.Backoff(clock)
    assert waits(backoff, clock, [0.1] * 6) == [0.5, 1, 2, 4, 5, 5]


def test_backoff_starts_over_only_after_an_attempt_that_lasted():
    clock = Clock()
    backoff = gateway.Backoff(clock)
    reset = gateway.BACKOFF_RESET
    assert waits(backoff, clock, [1, 1, 1]) == [0.5, 1, 2]
    # A connection that worked for a while, then broke: retry soon.
    assert waits(backoff, clock, [reset, 1]) == [0.5, 1]
    # One that broke at once (a channel closed on opening, say) keeps doubling.
    assert waits(backoff, clock, [reset - 0.01, 1]) == [2, 4]


def test_both_services_back_off_alike():
    assert billing.Backoff is not gateway.Backoff
    for module in (gateway, billing):
        clock = Clock()
        assert waits(module.Backoff(clock), clock, [1, 1, 60, 1]) == [0.5, 1, 0.5, 1]


# --- One source for the queue arguments ---

NEEDLE = "x-dead-" + "letter"  # split, so that this file is no copy itself


def copies_outside_the_services(root):
    """Files (other than the services' shared amqp blocks) that spell the arguments."""
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if not path.is_file() or parts[0] in ("venv", "node_modules", ".git"):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if path.name in ("gateway.py", "billing.py") and len(parts) == 1:
            text = text.replace(helpers.shared_block(text, "amqp"), "")
        if NEEDLE in text:
            found.append(str(path.relative_to(root)))
    return found


def test_the_queue_arguments_are_spelt_once_in_each_service_and_nowhere_else():
    assert copies_outside_the_services(ROOT) == []
    assert gateway.queue_arguments("q") == billing.queue_arguments("q")


def test_a_copy_of_the_queue_arguments_is_found(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "x.sh").write_text(f'args="{NEEDLE}-exchange"\n')
    for name in ("gateway.py", "billing.py"):
        text = (ROOT / name).read_text()
        (tmp_path / name).write_text(text + f"\nA = '{NEEDLE}-routing-key'\n")
    assert copies_outside_the_services(tmp_path) == [
        "billing.py",
        "gateway.py",
        "scripts/x.sh",
    ]


def test_provisioning_declares_the_queue_with_billings_arguments():
    queue = f"test_amqp_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "RABBITMQ_QUEUE": queue,
        "RABBITMQ_PORT": "5672",
        "VENV_ROOT": str(ROOT / "venv"),
        "REPO_DIR": str(ROOT),
    }
    script = 'source "$REPO_DIR/scripts/lib.sh"; declare_billing_queues'
    try:
        done = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        conn, channel = helpers.rabbit_channel()
        arguments = billing.queue_arguments(queue)
        channel.queue_declare(queue, durable=True, arguments=arguments)  # the same
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.queue_declare(queue, durable=True)  # without them: refused
        conn.close()
    finally:
        helpers.delete_queues(queue)


# --- Publisher.stop() ---


def broker_connections(name):
    """How many connections RabbitMQ holds with this connection_name."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return out.count(f'{{"connection_name","{name}"}}')


def publisher_threads():
    """The publisher threads alive in this process."""
    return [t for t in threading.enumerate() if t.name == "publisher"]


@pytest.fixture
def queue():
    """A queue name of the test's own, deleted afterwards."""
    name = f"test_amqp_{uuid.uuid4().hex[:8]}"
    yield name
    helpers.delete_queues(name)


def test_stop_closes_the_connection_and_ends_the_thread(queue):
    name = f"test-amqp-{uuid.uuid4().hex[:8]}"
    params = helpers.rabbit_params()
    params.client_properties = {"connection_name": name}
    publisher = gateway.Publisher(params, queue)
    publisher.start()
    helpers.wait_for(publisher.ready.is_set, timeout=15, what="the publisher")
    assert broker_connections(name) == 1
    publisher.stop()
    assert publisher_threads() == []
    assert publisher.status() == "publisher not running"
    helpers.wait_for(
        lambda: broker_connections(name) == 0, what="the connection to close"
    )
    with pytest.raises(gateway.ApiError) as err:
        publisher.publish(b"{}", "after-stop")
    assert err.value.status == 503


def test_stop_right_after_start_ends_the_thread(queue):
    for _ in range(5):
        publisher = gateway.Publisher(helpers.rabbit_params(), queue)
        publisher.start()
        publisher.stop()
        assert publisher_threads() == []


def test_stop_while_backing_off_ends_the_thread_at_once(queue):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1)
    publisher = gateway.Publisher(params, queue)
    publisher.start()
    helpers.wait_for(
        lambda: publisher.status() != "connecting", what="a refused attempt"
    )
    assert "unreachable" in publisher.status()
    publisher.stop()
    assert publisher_threads() == []


def test_a_classic_queue_is_drained_then_declared_quorum(orders_db):
    """The migration of a classic billing_queue to a quorum one (provisioning's
    ensure_billing_queues) under orders: billing, consuming as on the VMs (it
    may not declare), empties it; publishes meanwhile are refused, never
    acknowledged and lost; afterwards billing consumes the quorum queue."""
    queue = f"test_migrate_{uuid.uuid4().hex[:8]}"
    user, password = f"test_consumer_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", user], input=password, text=True, check=True)
    subprocess.run(
        [*ctl, "set_permissions", user, "^$", "^$", f"^{queue}$"], check=True
    )
    first = [order_body(i) for i in range(2000)]
    first_ids = [helpers.message_id(f"first-{i}") for i in range(2000)]
    helpers.publish_raw(queue, first, first_ids)
    env = helpers.billing_env(queue)
    env |= {"RABBITMQ_BILLING_USER": user, "RABBITMQ_BILLING_PASSWORD": password}
    consumer = helpers.Service("billing", env).start()
    stop, acked, refused = threading.Event(), [], []
    publisher = threading.Thread(
        target=keep_publishing, args=(queue, stop, acked, refused)
    )
    publisher.start()
    try:
        script = 'source "$REPO_DIR/scripts/lib.sh"; ensure_billing_queues'
        env = {
            **os.environ,
            "RABBITMQ_QUEUE": queue,
            "RABBITMQ_QUEUE_TYPE": "quorum",
            "RABBITMQ_PORT": "5672",
            "VENV_ROOT": str(ROOT / "venv"),
            "REPO_DIR": str(ROOT),
        }
        done = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "drained in" in done.stdout, done.stdout
        time.sleep(1)  # orders after the migration, too
    finally:
        stop.set()
        publisher.join()
    try:
        listed = subprocess.run(
            [*ctl, "list_queues", "--no-table-headers", "name", "type"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{queue}\tquorum" in listed.splitlines()
        assert refused and acked, (len(refused), len(acked))
        wanted = set(first_ids) | set(acked)
        helpers.wait_for(
            lambda: stored_ids(orders_db) >= wanted,
            timeout=60,
            what="every order acknowledged to be stored",
        )
        rows = helpers.rows(
            orders_db, "SELECT count(*), count(DISTINCT message_id) FROM orders"
        )
        assert rows[0][0] == rows[0][1]  # none twice
        assert helpers.queue_depth(f"{queue}.dead") == 0
    finally:
        consumer.stop()
        subprocess.run([*ctl, "delete_user", user], check=False)
        helpers.delete_queues(queue)


def order_body(i):
    return {"user_id": i + 1, "number_of_items": 1, "total_amount": "1.00"}


def keep_publishing(queue, stop, acked, refused):
    """Publish orders (mandatory, confirmed) until stop: acked ids, refused ones."""
    conn = channel = None
    i = 0
    while not stop.is_set():
        if conn is None or not conn.is_open:
            params = helpers.rabbit_params()
            params.blocked_connection_timeout = 1  # blocked: give up, as the gateway
            conn = pika.BlockingConnection(params)
            channel = conn.channel()
            channel.confirm_delivery()
        i += 1
        message_id = helpers.message_id(f"during-{i}")
        props = pika.BasicProperties(delivery_mode=2, message_id=message_id)
        try:
            channel.basic_publish(
                "", queue, json.dumps(order_body(i)), props, mandatory=True
            )
            acked.append(message_id)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
            refused.append(message_id)
        except pika.exceptions.AMQPConnectionError:
            refused.append(message_id)  # blocked: in doubt, as a gateway's 503
            conn = None
        time.sleep(0.005)
    if conn is not None and conn.is_open:
        conn.close()


def stored_ids(dbname):
    return {row[0] for row in helpers.rows(dbname, "SELECT message_id FROM orders")}
