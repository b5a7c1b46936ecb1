"""Test helpers for this machine's RabbitMQ: channels as guest, the tests'
queues, publishing by hand, and stopping or starting the broker."""

import hashlib
import json
import subprocess
import uuid

import pika
import pytest
from helpers_core import wait_for

from gateway import queue_arguments  # the one copy of the arguments


def rabbit_params():
    """Connection parameters for the local RabbitMQ (guest, loopback only)."""
    return pika.ConnectionParameters(
        "127.0.0.1",
        5672,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=3,
    )


def rabbit_channel():
    """A fresh blocking channel; fails with a hint if RabbitMQ is down."""
    try:
        conn = pika.BlockingConnection(rabbit_params())
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"RabbitMQ is not reachable ({exc!r}); start it with: rabbitmq-server -detached"
        )
    return conn, conn.channel()


def delete_queues(*names):
    """Remove test queues (and their dead-letter queues)."""
    conn, channel = rabbit_channel()
    for name in names:
        channel.queue_delete(name)
        channel.queue_delete(f"{name}.dead")
    conn.close()


def queue_depth(name):
    """Messages ready in a queue (0 if the queue does not exist)."""
    conn, channel = rabbit_channel()
    try:
        return channel.queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def drain_queue(queue):
    """Take every message off queue; return [(properties, body)]."""
    conn, channel = rabbit_channel()
    got = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        got.append((properties, body))
    conn.close()
    return got


def message_id(label):
    """A message id of the gateway's random form, the same for the same label."""
    return hashlib.sha256(str(label).encode()).hexdigest()[:32]


def publish_raw(queue, bodies, message_ids=None, declare=True):
    """Publish bodies straight to queue with confirms (as a person could).

    Without message_ids each message gets a new id of the gateway's form;
    a given list is used as it is (None: no message id)."""
    conn, channel = rabbit_channel()
    if declare:
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.queue_declare(
            queue,
            durable=True,
            arguments=queue_arguments(queue),
        )
    channel.confirm_delivery()
    for i, body in enumerate(bodies):
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=uuid.uuid4().hex if message_ids is None else message_ids[i],
        )
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        channel.basic_publish("", queue, body, props)
    conn.close()


def rabbit(action, *args):
    """rabbitmqctl action (stop_app, start_app, set_disk_free_limit N...); a
    start waits until RabbitMQ takes connections."""
    subprocess.run(
        ["rabbitmqctl", "-q", action, *args], check=True, capture_output=True
    )
    if action == "start_app":
        wait_for(_rabbit_accepts, timeout=30, what="RabbitMQ to accept connections")


def _rabbit_accepts():
    params = pika.ConnectionParameters(
        "127.0.0.1",
        5672,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=2,
    )
    try:
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False
