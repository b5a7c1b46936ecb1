"""AMQP: one back-off rule, and a publisher that stops."""

import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pika
import pytest
from conftest import delete_queues
from conftest import rabbit_params
from conftest import wait_for

import billing
import gateway

ROOT = Path(__file__).resolve().parent.parent


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
    delete_queues(name)


def test_stop_closes_the_connection_and_ends_the_thread(queue):
    name = f"test-amqp-{uuid.uuid4().hex[:8]}"
    params = rabbit_params()
    params.client_properties = {"connection_name": name}
    publisher = gateway.Publisher(params, queue)
    publisher.start()
    wait_for(publisher.ready.is_set, timeout=15, what="the publisher")
    assert broker_connections(name) == 1
    publisher.stop()
    assert publisher_threads() == []
    assert publisher.status() == "publisher not running"
    wait_for(lambda: broker_connections(name) == 0, what="the connection to close")
    with pytest.raises(gateway.ApiError) as err:
        publisher.publish(b"{}", "after-stop")
    assert err.value.status == 503


def test_stop_right_after_start_ends_the_thread(queue):
    for _ in range(5):
        publisher = gateway.Publisher(rabbit_params(), queue)
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
    wait_for(lambda: publisher.status() != "connecting", what="a refused attempt")
    assert "unreachable" in publisher.status()
    publisher.stop()
    assert publisher_threads() == []
