"""RabbitMQ restarted under traffic: no order confirmed with 200 is lost.

It stops RabbitMQ: run no other test suite meanwhile
(it would be hit by the outage):

    sudo ./scripts/test.sh -k faults_rabbitmq
"""

import shutil
import subprocess
import time

import helpers


def test_rabbitmq_restart_while_posting(procs, inventory, queue, orders_db):
    billing = procs("billing", helpers.billing_env(queue))
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    posters = helpers.Posters(gateway.port, threads=8, first_user=1_000_000).start()
    try:
        time.sleep(2)
        try:
            helpers.rabbit("stop_app")
            time.sleep(4)
        finally:
            helpers.rabbit("start_app")
        back = time.monotonic()
        helpers.wait_for(
            lambda: posters.ok_since(back) >= 50,
            timeout=40,
            what="posts to succeed again after RabbitMQ came back",
        )
        first_ok = min(t for _, s, _, t in posters.results if s == 200 and t >= back)
        time.sleep(1)
    finally:
        posters.stop()
    ok, other, statuses, slowest = posters.summary()
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0, "no request noticed the outage"
    assert slowest < helpers.ANSWER_WITHIN, f"a request took {slowest:.1f}s"
    assert billing.proc.poll() is None and gateway.proc.poll() is None
    counts = helpers.wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    assert not lost and not duplicated
    helpers.figure(
        "rabbit_restart",
        posted=len(posters.results),
        ok=len(ok),
        unavailable=statuses[503],
        stored_ok=len(ok & set(counts)),
        stored_after_503=len(other & set(counts)),
        lost=len(lost),
        duplicated=duplicated,
        max_latency_s=f"{slowest:.2f}",
        first_200_after_restart_s=f"{first_ok - back:.1f}",
    )


def test_disk_alarm_refuses_orders_at_once_and_health_says_so(
    procs, inventory, queue, orders_db
):
    """RabbitMQ's disk alarm blocks the gateway's connection: once told, the
    gateway answers 503 at once (not after the publish timeout), /health names
    the alarm, and orders are taken again as soon as it ends, on the same
    connection. The order caught in the block is kept or refused, never lost."""
    procs("billing", helpers.billing_env(queue))
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    post = lambda user: helpers.call(  # noqa: E731
        gateway.url, "POST", "/api/billing/", helpers.order(user)
    )
    assert post(3_000_000)[0] == 200
    free = shutil.disk_usage("/var/lib/rabbitmq").free
    try:
        helpers.rabbit("set_disk_free_limit", str(free * 2))
        # The broker tells a connection it is blocked when it next publishes.
        assert post(3_000_001)[0] == 503
        helpers.wait_for(
            lambda: (
                "blocked" in helpers.call(gateway.url, "GET", "/health")[2]["rabbitmq"]
            ),
            timeout=10,
            what="/health to name the alarm",
        )
        status, _, health = helpers.call(gateway.url, "GET", "/health")
        assert status == 503, health
        start = time.monotonic()
        status, _, body = post(3_000_002)
        took = time.monotonic() - start
        assert status == 503 and took < 1, (status, body, took)
    finally:
        helpers.rabbit("set_disk_free_limit", "50MB")
    helpers.wait_for(
        lambda: post(3_000_003)[0] == 200, timeout=10, what="orders taken again"
    )
    stored = helpers.wait_stored({3_000_000, 3_000_003}, 3_000_000, 3_000_003)
    assert stored.get(3_000_000) == stored.get(3_000_003) == 1, stored
    assert stored.get(3_000_002) is None  # refused at once: never published
    helpers.figure(
        "rabbit_disk_alarm",
        refused_while_blocked_s=f"{took:.2f}",
        health=health["rabbitmq"],
        caught_in_the_block_stored=stored.get(3_000_001, 0),
    )


def connections_through(proxy):
    """RabbitMQ's ids of the connections that came in through proxy."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        pid
        for pid, port in (line.split() for line in out.splitlines() if line.strip())
        if port.isdigit() and int(port) in proxy.outbound
    ]


def test_gateway_and_billing_move_to_the_next_node(procs, inventory, queue, orders_db):
    """With RABBITMQ_HOSTS, each reconnection goes to the next node: past one
    that refuses, away from one that closes the connection as on shutdown
    (320 CONNECTION_FORCED) and from one that vanishes (TCP reset). Orders
    flow throughout, each one answered 200 stored once."""
    # Three "nodes" on 127.0.0.2-4, port 5672: two proxies to this machine's
    # RabbitMQ, and one address where nothing listens.
    nodes = [
        helpers.TcpProxy(f"127.0.0.{n}", 5672, ("127.0.0.1", 5672)) for n in (2, 3)
    ]
    hosts = {"RABBITMQ_HOSTS": "127.0.0.4, 127.0.0.2,127.0.0.3"}
    try:
        procs("billing", {**helpers.billing_env(queue), **hosts})
        port = helpers.free_port()
        env = {**helpers.gateway_env(port, inventory.port, queue), **hosts}
        gateway = procs("gateway", env, port)
        helpers.wait_for(
            lambda: helpers.call(gateway.url, "GET", "/health")[0] == 200,
            what="the gateway on the second node",
        )
        helpers.wait_for(
            lambda: nodes[0].accepted == 2, what="billing and the gateway on node 2"
        )
        assert nodes[1].accepted == 0
        posters = helpers.Posters(gateway.port, threads=4, first_user=4_000_000).start()
        try:
            time.sleep(1)
            for pid in connections_through(nodes[0]):
                helpers.rabbit("close_connection", pid, "node shutting down")
            helpers.wait_for(
                lambda: nodes[1].accepted == 2, what="both on the third node"
            )
            moved = time.monotonic()
            helpers.wait_for(lambda: posters.ok_since(moved) >= 20, what="orders again")
            nodes[1].close()  # gone: past the node that refuses, back to the second
            helpers.wait_for(lambda: nodes[0].accepted == 4, what="both on the second")
            moved = time.monotonic()
            helpers.wait_for(lambda: posters.ok_since(moved) >= 20, what="orders again")
        finally:
            posters.stop()
    finally:
        for node in nodes:
            node.close()
    ok, _, statuses, slowest = posters.summary()
    assert set(statuses) <= {200, 503}, statuses
    assert slowest < helpers.ANSWER_WITHIN, slowest
    counts = helpers.wait_stored(ok, posters.first_user, posters.last_user)
    assert all(n == 1 for n in counts.values())
    helpers.figure(
        "rabbit_next_node",
        posted=len(posters.results),
        ok=len(ok),
        unavailable=statuses[503],
        duplicated=sum(n - 1 for n in counts.values()),
        max_latency_s=f"{slowest:.2f}",
    )
