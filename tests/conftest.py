"""Fixtures: test databases, queues, the services as subprocesses.

The helpers they use (and the tests too) are in helpers.py.
"""

import contextlib
import subprocess
import uuid

import helpers
import pytest


@pytest.fixture(scope="session")
def movies_db():
    """A fresh movies_test database owned by the inventory role."""
    helpers.recreate_database(
        helpers.MOVIES_TEST_DB,
        helpers.ENV["INVENTORY_DB_USER"],
        helpers.ENV["INVENTORY_DB_PASSWORD"],
        "inventory_schema.sql",
    )
    return helpers.MOVIES_TEST_DB


@pytest.fixture(scope="session")
def billing_db():
    """A fresh billing_test database owned by the billing role."""
    helpers.recreate_database(
        helpers.BILLING_TEST_DB,
        helpers.ENV["BILLING_DB_USER"],
        helpers.ENV["BILLING_DB_PASSWORD"],
        "billing_schema.sql",
    )
    return helpers.BILLING_TEST_DB


@pytest.fixture(scope="session")
def inventory(movies_db):
    """A running inventory on a free port, against movies_test."""
    port = helpers.free_port()
    service = helpers.Service("inventory", helpers.inventory_env(port), port).start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def queue_name():
    """The queue of the session's `gateway` (shared: see `queue` for one's own)."""
    name = f"test_billing_{uuid.uuid4().hex[:8]}"
    yield name
    helpers.delete_queues(name)


@pytest.fixture(scope="session")
def gateway(inventory, queue_name):
    """A running gateway in front of the test inventory and the test queue."""
    port = helpers.free_port()
    service = helpers.Service(
        "gateway", helpers.gateway_env(port, inventory.port, queue_name), port
    )
    service.start()
    helpers.wait_for(
        lambda: helpers.call(service.url, "GET", "/health")[0] == 200,
        what="gateway /health to answer 200",
    )
    yield service
    service.stop()


@pytest.fixture
def clean_movies(movies_db):
    """Empty the movies table before a test."""
    with helpers.admin_connect(movies_db) as conn:
        conn.execute("TRUNCATE movies RESTART IDENTITY")
    return movies_db


@pytest.fixture
def queue():
    """A queue name of the test's own; it and its dead-letter queue go afterwards."""
    name = f"test_queue_{uuid.uuid4().hex[:8]}"
    yield name
    helpers.delete_queues(name)


@pytest.fixture
def orders_db(billing_db):
    """billing_test with an empty orders table."""
    with helpers.admin_connect(billing_db) as conn:
        conn.execute("TRUNCATE orders RESTART IDENTITY")
    return billing_db


@pytest.fixture
def procs(queue):
    """Start services for one test; stop whatever still runs afterwards.

    Depends on `queue` so that the services stop before their queue is deleted
    (a running consumer would declare it again).
    """
    started = []

    def start(name, env, port=None):
        service = helpers.Service(name, env, port)
        started.append(service)
        return service.start()

    yield start
    for service in reversed(started):
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()  # on a timeout, Service.stop has killed it


@pytest.fixture(params=["gateway", "inventory"])
def server(request):
    """Each HTTP server in turn, for the behaviour both must share."""
    return request.getfixturevalue(request.param)
