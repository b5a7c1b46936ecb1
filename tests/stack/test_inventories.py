"""Two inventories behind one gateway (INVENTORY_HOSTS): the load is shared, a
stopped or hung one is left out within seconds and taken back once it answers,
and a request that may have reached an inventory is sent to no other unless it
is idempotent."""

import re
import signal
import socket
import time

import helpers
import pytest

import gateway as gateway_module

ADDRESSES = ("127.0.0.2", "127.0.0.3")


def start_inventory(procs, address, port):
    env = {
        **helpers.inventory_env(port),
        "INVENTORY_HOST": address,
        "LOG_LEVEL": "DEBUG",
    }
    service = procs("inventory", env)
    helpers.wait_for(lambda: listening(address, port), what=f"inventory on {address}")
    return service


def listening(address, port):
    try:
        socket.create_connection((address, port), 0.2).close()
        return True
    except OSError:
        return False


def served(service):
    """Movie requests in the inventory's access lines (LOG_LEVEL=DEBUG)."""
    text = service.log_path.read_text(errors="replace")
    return len(re.findall(r" /api/movies", text))


@pytest.fixture
def pair(procs, queue, clean_movies):
    port = helpers.free_port()
    inventories = [start_inventory(procs, address, port) for address in ADDRESSES]
    gw_port = helpers.free_port()
    env = helpers.gateway_env(gw_port, port, queue)
    env["INVENTORY_HOSTS"] = ",".join(ADDRESSES)
    gateway = procs("gateway", env, gw_port)
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "GET", "/health")[0] == 200,
        what="gateway /health 200",
    )
    return gateway, inventories, port


def health(gateway):
    status, _, body = helpers.call(gateway.url, "GET", "/health")
    return status, body


def test_two_inventories_share_the_load_and_health_names_them(pair):
    gateway, inventories, port = pair
    before = [served(s) for s in inventories]
    for _ in range(20):
        assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
    after = [served(s) for s in inventories]
    assert [a - b for a, b in zip(after, before, strict=True)] == [10, 10]
    status, body = health(gateway)
    assert status == 200 and body["inventory"] == "ok", body  # no billing: degraded
    assert body["inventories"] == {f"{a}:{port}": "ok" for a in ADDRESSES}


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_a_dead_inventory_is_left_out_and_taken_back(pair, how):
    gateway, inventories, port = pair
    dead = inventories[0]
    if how == "stopped":
        dead.stop()
    else:
        dead.proc.send_signal(signal.SIGSTOP)
    try:
        # Within a few seconds nothing is sent to it; meanwhile a GET may time
        # out (504) once, a POST may fail once (it may have reached it).
        time.sleep(gateway_module.CHECK_EVERY + gateway_module.HEALTH_TIMEOUT + 0.5)
        created = 0
        for i in range(20):
            assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
            movie = {"title": f"t{i}", "description": "d"}
            status, _, _ = helpers.call(gateway.url, "POST", "/api/movies", movie)
            assert status == 201
            created += 1
        rows = helpers.rows(helpers.MOVIES_TEST_DB, "SELECT count(*) FROM movies")
        assert rows == [(created,)]  # each POST stored once
        status, body = health(gateway)
        assert status == 200 and body["inventory"] == "ok", body
        assert body["inventories"][f"{ADDRESSES[1]}:{port}"] == "ok"
        assert body["inventories"][f"{ADDRESSES[0]}:{port}"] != "ok"
    finally:
        if how == "hung":
            dead.proc.send_signal(signal.SIGCONT)
    if how == "stopped":
        dead.start(wait=False)
        helpers.wait_for(lambda: listening(ADDRESSES[0], port), what="inventory again")
    count = served(dead)
    deadline = (
        time.monotonic() + gateway_module.CHECK_EVERY + gateway_module.DOWN_FOR + 2
    )
    while served(dead) == count:
        assert time.monotonic() < deadline, "the revived inventory got no request"
        assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
        time.sleep(0.1)
    helpers.wait_for(
        lambda: set(health(gateway)[1]["inventories"].values()) == {"ok"},
        what="both inventories ok on /health",
    )


def test_every_inventory_down_is_503_on_health_and_502_on_movies(pair):
    gateway, inventories, port = pair
    for service in inventories:
        service.stop()
    status, _, body = helpers.call(gateway.url, "GET", "/api/movies")
    assert status == 502 and body["error"] == "inventory unreachable", body
    status, body = health(gateway)
    assert status == 503 and body["inventory"] != "ok", body
    assert set(body["inventories"]) == {f"{a}:{port}" for a in ADDRESSES}
