"""RabbitMQ restarted under traffic: no order confirmed with 200 is lost.

It stops RabbitMQ: run no other test suite meanwhile
(it would be hit by the outage):

    sudo ./scripts/test.sh -k faults_rabbitmq
"""

import shutil
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
