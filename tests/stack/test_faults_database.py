"""PostgreSQL restarted or stopped: billing loses nothing, inventory answers 503.

It stops PostgreSQL: run no other test suite meanwhile
(it would be hit by the outage):

    sudo ./scripts/test.sh -k faults_database
"""

import concurrent.futures
import time

import helpers

# --- Billing database restarted under traffic ---


def test_billing_database_restart_while_posting(procs, inventory, queue, orders_db):
    billing = procs("billing", helpers.billing_env(queue))
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    posters = helpers.Posters(gateway.port, threads=8, first_user=2_000_000).start()
    try:
        time.sleep(1.5)
        try:
            helpers.pg("stop")
            time.sleep(4)
            backlog = helpers.queue_depth(queue)
        finally:
            helpers.pg("start")
        time.sleep(2)
    finally:
        posters.stop()
    ok, _, statuses, slowest = posters.summary()
    assert set(statuses) == {200}, statuses
    assert billing.proc.poll() is None
    counts = helpers.wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    dead = helpers.queue_depth(f"{queue}.dead")
    assert not lost and not duplicated and not dead
    assert backlog > 0, "orders did not pile up during the outage"
    helpers.figure(
        "billing_db_restart",
        posted=len(posters.results),
        ok=len(ok),
        stored=len(counts),
        lost=len(lost),
        duplicated=duplicated,
        dead_lettered=dead,
        backlog_during_outage=backlog,
        max_latency_s=f"{slowest:.2f}",
    )


# --- Inventory database restarted ---


def test_inventory_database_outage_is_503_then_recovers(
    procs, inventory, queue, clean_movies
):
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    _, _, movie = helpers.call(gateway.url, "POST", "/api/movies", {"title": "Before"})
    probes = [
        (service, method, path, body)
        for service in (inventory, gateway)
        for method, path, body in (
            ("GET", "/api/movies", None),
            ("GET", f"/api/movies/{movie['id']}", None),
            ("GET", "/api/movies?title=Bef&limit=5", None),
            ("POST", "/api/movies", {"title": "During outage"}),
            ("PUT", f"/api/movies/{movie['id']}", {"title": "Changed"}),
            ("DELETE", f"/api/movies/{movie['id']}", None),
        )
    ]
    try:
        helpers.pg("stop")
        with concurrent.futures.ThreadPoolExecutor(len(probes)) as pool:
            answers = list(pool.map(lambda p: helpers.timed_call(*p), probes))
            health = helpers.timed_call(gateway, "GET", "/health")
    finally:
        helpers.pg("start")
    back = time.monotonic()
    for (service, method, path, _), (status, body, seconds) in zip(
        probes, answers, strict=True
    ):
        assert status == 503, (service.name, method, path, status, body)
        assert body == {"error": "database unavailable"}, (service.name, path)
        assert seconds < helpers.ANSWER_WITHIN, (service.name, method, path, seconds)
    assert health[0] == 503 and health[1]["inventory"] != "ok"
    for service in (inventory, gateway):
        helpers.wait_for(
            lambda s=service: helpers.call(s.url, "GET", "/api/movies")[0] == 200,
            timeout=30,
            what=f"{service.name} to recover",
        )
    recovered = time.monotonic() - back
    assert (
        helpers.call(gateway.url, "POST", "/api/movies", {"title": "After"})[0] == 201
    )
    assert inventory.proc.poll() is None and gateway.proc.poll() is None
    assert helpers.rows(clean_movies, "SELECT title FROM movies ORDER BY id") == [
        ("Before",),
        ("After",),
    ]
    helpers.figure(
        "inventory_db_outage",
        answers=len(answers),
        all_503=True,
        max_answer_s=f"{max(a[2] for a in answers):.1f}",
        recovered_after_s=f"{recovered:.1f}",
    )
