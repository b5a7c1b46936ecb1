"""RabbitMQ restarted under traffic: no order confirmed with 200 is lost.

It stops RabbitMQ: run no other test suite meanwhile
(it would be hit by the outage):

    sudo ./scripts/test.sh -k faults_rabbitmq
"""

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
