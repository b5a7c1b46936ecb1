"""How a request thread hands an order to the publisher thread and waits.

The order goes into an outbox; one ioloop wake-up publishes every order that
came meanwhile; the request waits on a one-lock latch; the log line is written
once RabbitMQ confirms. None of it may lose or strand an order.
"""

import concurrent.futures
import contextlib
import logging
import threading
import time
import types

import pika
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gateway

# --- The latch ---


def test_latch_gives_its_result_once_settled():
    latch = gateway._Latch()
    assert not latch.done()
    latch.set_result(None)
    assert latch.done()
    assert latch.result(0) is None
    assert latch.result(0) is None  # a second wait returns at once, too
    assert latch.exception(0) is None


def test_latch_raises_its_error():
    latch = gateway._Latch()
    latch.set_exception(ConnectionError("gone"))
    with pytest.raises(ConnectionError, match="gone"):
        latch.result(0)
    assert isinstance(latch.exception(0), ConnectionError)


def test_latch_times_out_unsettled():
    latch = gateway._Latch()
    begun = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        latch.result(0.2)
    assert 0.15 < time.monotonic() - begun < 2
    assert not latch.done()


def test_latch_settles_once():
    latch = gateway._Latch()
    latch.set_result(None)
    with pytest.raises(concurrent.futures.InvalidStateError):
        latch.set_exception(ConnectionError("late"))
    assert latch.result(0) is None
    gateway._fail(latch, "late")  # _fail leaves a settled latch alone
    assert latch.result(0) is None


def test_latch_wakes_a_waiting_thread():
    latch = gateway._Latch()
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(latch.exception(5)))
    waiter.start()
    time.sleep(0.05)
    latch.set_exception(ConnectionError("nacked"))
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(waited[0], ConnectionError)


# --- The outbox ---


class FakeIOLoop:
    """Records add_callback_threadsafe calls; run() plays the ioloop."""

    def __init__(self):
        self.callbacks = []
        self.lock = threading.Lock()

    def add_callback_threadsafe(self, callback):
        with self.lock:
            self.callbacks.append(callback)

    def run(self):
        with self.lock:
            callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()
        return len(callbacks)


def fake_publisher(monkeypatch):
    """A Publisher whose session is ready on a fake ioloop; sent orders listed."""
    publisher = gateway.Publisher(pika.ConnectionParameters(), "q")
    ioloop = FakeIOLoop()
    publisher._session.conn = types.SimpleNamespace(
        ioloop=ioloop, batch=contextlib.nullcontext
    )
    publisher.ready.set()
    sent = []
    monkeypatch.setattr(publisher._session.confirms, "send", sent.append)
    monkeypatch.setattr(gateway, "PUBLISH_TIMEOUT", 5)
    return publisher, ioloop, sent


def start_publishes(publisher, count):
    """count publish() calls in threads; the list of (thread, outcome box)."""
    calls = []
    for i in range(count):
        box = []

        def call(i=i, box=box):
            try:
                publisher.publish(b"{}", f"m{i}", f"r{i}")
                box.append("ok")
            except gateway.ApiError as exc:
                box.append(exc.status)

        thread = threading.Thread(target=call)
        thread.start()
        calls.append((thread, box))
    return calls


def wait_outbox(publisher, count):
    deadline = time.monotonic() + 5
    while len(publisher._outbox) < count:
        assert time.monotonic() < deadline, "the orders never reached the outbox"
        time.sleep(0.005)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=12))
def test_one_wake_up_publishes_every_order_handed_over(count):
    with pytest.MonkeyPatch.context() as monkeypatch:
        publisher, ioloop, sent = fake_publisher(monkeypatch)
        calls = start_publishes(publisher, count)
        wait_outbox(publisher, count)
        assert ioloop.run() == 1  # one wake-up for all of them
        assert sorted(o.properties.message_id for o in sent) == sorted(
            f"m{i}" for i in range(count)
        )
        assert not publisher._outbox.items and not publisher._outbox.woken
        for outgoing in sent:
            outgoing.future.set_result(None)
        for thread, box in calls:
            thread.join(5)
            assert box == ["ok"]
        # The next order wakes the ioloop again.
        calls = start_publishes(publisher, 1)
        wait_outbox(publisher, 1)
        assert ioloop.run() == 1 and len(sent) == count + 1
        sent[-1].future.set_result(None)
        calls[0][0].join(5)


def test_orders_stranded_by_a_lost_ioloop_fail_and_the_next_one_wakes_anew(
    monkeypatch,
):
    publisher, ioloop, sent = fake_publisher(monkeypatch)
    calls = start_publishes(publisher, 3)
    wait_outbox(publisher, 3)
    ioloop.callbacks.clear()  # the ioloop went away before running its wake-up
    publisher._outbox.clear("connection lost")
    for thread, box in calls:
        thread.join(5)
        assert box == [503]  # answered at once, not after PUBLISH_TIMEOUT
    assert sent == []
    calls = start_publishes(publisher, 1)
    wait_outbox(publisher, 1)
    assert ioloop.run() == 1 and len(sent) == 1  # not left waiting for good
    sent[0].future.set_result(None)
    calls[0][0].join(5)
    assert calls[0][1] == ["ok"]


def test_a_new_connection_fails_what_the_last_ioloop_never_published(monkeypatch):
    publisher, _, sent = fake_publisher(monkeypatch)
    calls = start_publishes(publisher, 2)
    wait_outbox(publisher, 2)

    def connect(params, ioloop):
        raise RuntimeError("no broker in this test")

    monkeypatch.setattr(publisher._session, "connect", connect)
    with pytest.raises(RuntimeError):
        publisher._serve()  # a new connection begins: the outbox is cleared first
    for thread, box in calls:
        thread.join(5)
        assert box == [503]
    assert sent == [] and not publisher._outbox.items and not publisher._outbox.woken


class Reconnecting:
    """A session whose connection, when first read, drops and is replaced by
    new_conn as _run and _serve would do: the thread switch a race needs."""

    def __init__(self, publisher, new_conn):
        self.__dict__.update(real=publisher._session, publisher=publisher)
        self.__dict__.update(current=self.real.conn, new_conn=new_conn, reads=0)

    def __getattr__(self, name):
        return getattr(self.real, name)

    @property
    def conn(self):
        self.__dict__["reads"] += 1
        seen = self.current
        if self.reads == 1:
            switch = threading.Thread(target=self.reconnect)
            switch.start()
            switch.join(0.5)  # done, unless it waits for a lock the reader holds
        return seen

    def reconnect(self):
        self.publisher.ready.clear()
        self.publisher._outbox.clear("connection lost")
        self.__dict__["current"] = self.new_conn
        self.publisher.ready.set()


def test_a_reconnect_right_after_an_order_reads_the_connection_strands_nothing(
    monkeypatch,
):
    # The order read the old connection, the publisher reconnected, then the
    # order woke the old (dead) ioloop: _woken stayed set, and every later
    # order waited for a wake-up that never came: 503 until the next reconnect.
    publisher, _, sent = fake_publisher(monkeypatch)
    monkeypatch.setattr(gateway, "PUBLISH_TIMEOUT", 1)
    new_loop = FakeIOLoop()
    new_conn = types.SimpleNamespace(ioloop=new_loop, batch=contextlib.nullcontext)
    publisher._session = Reconnecting(publisher, new_conn)
    (first,) = start_publishes(publisher, 1)
    first[0].join(5)
    assert first[1] == [503]  # it may not be stored: 503, at once or in time
    calls = start_publishes(publisher, 1)
    wait_outbox(publisher, 1)
    assert new_loop.run() == 1, "the live connection was never woken"
    sent[-1].future.set_result(None)
    calls[0][0].join(5)
    assert calls[0][1] == ["ok"]


# --- The log line, once confirmed ---


def test_each_confirmed_order_gets_its_line_with_its_request_id(caplog):
    confirms = gateway._Confirms("q")
    confirms.channel = types.SimpleNamespace(basic_publish=lambda *a, **k: None)
    outgoing = [
        gateway._Outgoing(
            gateway._Latch(),
            b"{}",
            pika.BasicProperties(message_id=f"m{i}"),
            f"r{i}",
        )
        for i in range(5)
    ]
    for item in outgoing:
        confirms.send(item)
    nack = types.SimpleNamespace(method=pika.spec.Basic.Nack(2))
    ack = types.SimpleNamespace(method=pika.spec.Basic.Ack(5, multiple=True))
    with caplog.at_level(logging.INFO, logger="gateway"):
        confirms.settle(nack)
        confirms.settle(ack)
    lines = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    assert lines == [
        f"order m{i} published, request r{i}" for i in (0, 2, 3, 4)
    ]  # not the nacked one, which was not stored
    assert len(caplog.records) == 1  # one call for the ack's four orders
    assert isinstance(outgoing[1].future.exception(0), ConnectionError)
