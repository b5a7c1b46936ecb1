"""Orders handed to the publisher together go to the local RabbitMQ in one
write, each arriving whole and once."""

import threading
import time
import uuid

import helpers
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

import gateway


def wait_outbox(publisher, count):
    """Wait until count orders are in the publisher's outbox."""
    deadline = time.monotonic() + 5
    while len(publisher._outbox) < count:
        assert time.monotonic() < deadline, "the orders never reached the outbox"
        time.sleep(0.005)


# --- One write per wake-up, on a real connection ---


@pytest.fixture(scope="module")
def live_publisher():
    """A Publisher on the local RabbitMQ, publishing to a queue of its own."""
    queue = f"test_batch_{uuid.uuid4().hex[:8]}"
    publisher = gateway.Publisher(helpers.rabbit_params(), queue)
    publisher.start()
    helpers.wait_for(publisher.ready.is_set, timeout=15, what="the publisher")
    yield publisher, queue
    publisher.stop()
    helpers.delete_queues(queue)


def publish_in_one_wake_up(publisher, bodies):
    """Hold the ioloop until every body is in the outbox, then let it run;
    the sizes of the socket writes it made meanwhile."""
    blocked, gate = threading.Event(), threading.Event()
    publisher._session.conn.ioloop.add_callback_threadsafe(
        lambda: (blocked.set(), gate.wait(10))
    )
    assert blocked.wait(10)
    writes = []
    real = _AsyncTransportBase._sigint_safe_send

    def counting(sock, data):
        if data[0] != 8:  # not a heartbeat frame, which may come at any time
            writes.append(len(data))
        return real(sock, data)

    calls = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(
            _AsyncTransportBase, "_sigint_safe_send", staticmethod(counting)
        )
        for i, body in enumerate(bodies):
            box = []

            def call(i=i, body=body, box=box):
                try:
                    publisher.publish(body, f"b{i}", f"r{i}")
                    box.append("ok")
                except gateway.ApiError as exc:
                    box.append(exc.status)

            calls.append((threading.Thread(target=call), box))
            calls[-1][0].start()
        wait_outbox(publisher, len(bodies))
        gate.set()
        for thread, box in calls:
            thread.join(10)
            assert box == ["ok"]
    return writes


@settings(max_examples=15, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=10))
def test_orders_of_one_wake_up_go_out_in_one_write_and_arrive_whole(
    live_publisher, bodies
):
    publisher, queue = live_publisher
    writes = publish_in_one_wake_up(publisher, bodies)
    # pika sends each of a message's three frames (method, header, body) in
    # a system call of its own: here one write carries them all.
    assert len(writes) == 1, writes
    got = sorted((p.message_id, body) for p, body in helpers.drain_queue(queue))
    assert got == sorted((f"b{i}", body) for i, body in enumerate(bodies))
